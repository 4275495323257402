"""The end-to-end demo: fetch MNIST, train a standard teacher, an IBP student and a CC-Dist student
(DM-small, eps 0.1), certify with IBP, print the table. A few minutes on 2 CPU cores."""
from __future__ import annotations

import time
from pathlib import Path

from certdist import data as D
from certdist.config import load_config
from certdist.reporting import collect, format_table
from certdist.training.loop import train


def run_demo(out_dir: str = "runs/demo", quick: bool = False) -> int:
    t0 = time.time()
    D.fetch("mnist")
    common = [f"out_dir={out_dir}", "data.dataset=mnist", "model.arch=dm_small", "eps=0.1", "seed=0"]
    if quick:
        common += ["data.train_limit=2000", "data.test_limit=200", "epochs=2", "ramp_epochs=1", "lr_milestones=[]"]
    else:
        common += ["epochs=6", "ramp_epochs=3", "lr_milestones=[5]", "data.test_limit=2000"]
    runs = [
        ("teacher-standard", ["method=standard", "reg_weight=0", "model.init=default"]),
        ("student-ibp", ["method=ibp", "train_eps_mul=2.0"]),
        ("student-ccdist", ["method=cc-ibp", "alpha=0.1", "train_eps_mul=2.0",
                            f"distill.teacher={Path(out_dir) / 'teacher-standard' / 'last.pt'}"]),
    ]
    dirs = []
    for name, extra in runs:
        run_dir = Path(out_dir) / name
        if (run_dir / "results.json").exists():
            print(f"[demo] {name}: already finished, reusing {run_dir}")
        else:
            resume = (run_dir / "last.pt").exists()
            print(f"[demo] training {name}{' (resuming)' if resume else ''} ...")
            cfg = load_config(None, common + [f"name={name}"] + extra)
            train(cfg, resume=resume)
        dirs.append(run_dir)
    print()
    print(format_table(collect(dirs), group=False))
    print(f"\n[demo] done in {time.time() - t0:.0f} s; runs in {out_dir}")
    return 0
