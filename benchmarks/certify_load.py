"""Are certify's verdicts independent of the machine's load? Certify the same points idle and with K
CPU-bound processes beside them, under one effort budget, and compare the verdicts point by point.

    python benchmarks/certify_load.py runs/demo/student-ccibp/seed0/last.pt runs/demo/student-ccdist/seed0/last.pt \
        --dataset mnist --eps 0.1 -n 100 --load 2

Prints, per checkpoint and condition: the verdict counts, unknown %, points that reached the wall-clock
cap, wall time, and whether every point got the same (status, stage) in both conditions. The defaults
are the demo's budget (certdist.demo.BUDGET); ``--timeout`` / ``--max-domains`` / ``--attack-steps``
change it. With ``--timeout-only T`` the effort budget is made unlimited in practice (10^9 domains and
MILP nodes) so that only the T-second clock decides, the schedule before verifier 2026.12.1: run it to
see load change verdicts.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = ("import numpy as np, os\n"
        "a = np.random.rand(400, 400)\n"
        "while True:\n"
        "    a = np.tanh(a @ a / 400.0)\n")


@contextlib.contextmanager
def cpu_load(k: int):
    """``k`` single-threaded CPU-bound processes (matrix products) while inside."""
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env) for _ in range(k)]
    try:
        time.sleep(1.0 if k else 0.0)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("-n", "--num-points", type=int, default=100)
    p.add_argument("--load", type=int, default=2, help="CPU-bound processes beside the loaded run (default 2)")
    p.add_argument("--timeout", type=float, help="wall-clock cap per point (default: the demo's budget)")
    p.add_argument("--max-domains", type=int, help="branch-and-bound domains per point (default: the demo's)")
    p.add_argument("--attack-steps", type=int, help="PGD steps of the full attack (default: the demo's)")
    p.add_argument("--restarts", type=int, help="PGD restarts of the full attack (default: the demo's)")
    p.add_argument("--timeout-only", type=float, default=None,
                   help="no effort budget, only this many seconds per point (the old schedule's time budget)")
    p.add_argument("--data-dir", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from certdist.data import load
    from certdist.demo import BUDGET
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    from certdist.verification.certify import certify_dataset, read_records

    args = parse_args(argv)
    cfg = BUDGET
    for key, value in (("timeout", args.timeout), ("max_domains", args.max_domains),
                       ("attack_steps", args.attack_steps), ("restarts", args.restarts)):
        if value is not None:
            cfg = dataclasses.replace(cfg, **{key: value})
    if args.timeout_only is not None:
        cfg = dataclasses.replace(cfg, timeout=args.timeout_only, max_domains=10**9, milp_max_nodes=10**9)
    data = load(args.dataset, "test", data_dir=args.data_dir, limit=args.num_points)
    images, labels = data.images.float() / 255, data.labels.long()
    print(f"{args.num_points} points, eps {args.eps:g}, budget: timeout cap {cfg.timeout:g} s, quick attack "
          f"{cfg.quick_attack_steps}x{cfg.quick_restarts}, attack {cfg.attack_steps}x{cfg.restarts}, "
          f"max_domains {cfg.max_domains}, milp_max_nodes {cfg.milp_max_nodes}; load: {args.load} processes\n")
    print("| checkpoint | condition | verified | falsified | misclassified | unknown | unknown % | capped | wall s "
          "| same verdicts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        model, _ = model_from_checkpoint(ckpt)
        verdicts = {}
        with tempfile.TemporaryDirectory() as tmp:
            for cond, k in (("idle", 0), (f"{args.load} busy", args.load)):
                out = Path(tmp) / f"{k}.jsonl"
                with cpu_load(k):
                    t0 = time.monotonic()
                    s = certify_dataset(model, images, labels, ThreatModel(args.eps), out, config=cfg, progress=False)
                    wall = time.monotonic() - t0
                verdicts[cond] = {r["index"]: (r["status"], r["stage"]) for r in read_records(out)}
                c = s["counts"]
                same = "" if k == 0 else ("yes" if verdicts[cond] == verdicts["idle"] else
                                          f"no ({sum(verdicts[cond][i] != v for i, v in verdicts['idle'].items())} differ)")
                print(f"| {ckpt.parent.parent.name}/{ckpt.parent.name} | {cond} | {c['verified']} | {c['falsified']} | "
                      f"{c['misclassified']} | {c['unknown']} | {100 * c['unknown'] / max(s['n'], 1):.1f} | "
                      f"{s['capped']} | {wall:.0f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its load processes
    sys.exit(main())
