"""Wall time of one full training epoch of every method (configs/small, at the full training eps).

    python benchmarks/epoch_time.py [--dataset mnist] [--methods ibp cc-ibp ...] [--teacher CKPT]

Each method trains one epoch of its configs/small/<dataset>_<method>.yaml with the warm-up and the ramp
switched off (so every step pays the full certified cost, like the late epochs of a run) and the
per-epoch evaluation on 100 test points; the table gives the epoch's training time and its ratio to
the standard epoch. cc-dist needs a teacher checkpoint (default: runs/small/<dataset>_pgd-at-teacher/seed0).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["standard", "pgd-at-teacher", "ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "cc-dist"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--teacher")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    teacher = args.teacher or f"runs/small/{args.dataset}_pgd-at-teacher/seed0/last.pt"
    print("| method | epoch s | / standard |")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods:
            cmd = [sys.executable, "-m", "certdist", "train", "--config", str(root / f"configs/small/{args.dataset}_{m}.yaml"),
                   "epochs=1", "warmup_epochs=0", "ramp_epochs=0", "lr_milestones=[]", "data.test_limit=100",
                   "eval.pgd_steps=1", "progress=false", f"out_dir={tmp}", f"name={m}"]
            if m == "cc-dist":
                cmd.append(f"distill.teacher={teacher}")
            subprocess.run(cmd, check=True, capture_output=True)
            with open(Path(tmp) / m / "metrics.csv") as f:
                t = float(next(csv.DictReader(f))["time_s"])
            base = base or t
            print(f"| {m} | {t:.1f} | {t / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
