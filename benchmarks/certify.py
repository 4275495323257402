"""Certify the first N test points of a checkpoint and print the verdicts per status and stage.

    python benchmarks/certify.py CHECKPOINT --dataset mnist --eps 0.1 -n 100 --timeout 10

Prints the counts per status and per proving stage, median / max time per point and the certified
accuracy of IBP alone next to that of the whole pipeline (attack -> IBP -> CROWN -> alpha-CROWN ->
chain BaB / MILP). Results go to a JSON-lines file (``--out``); rerunning with the same file resumes.
``--dataset`` / ``--eps`` default to the checkpoint's config when it records them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _from_config(payload: dict[str, Any], *keys: str) -> Any:
    node: Any = payload.get("config", {})
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--dataset", help="dataset name for certdist.data.load (default: from the checkpoint)")
    p.add_argument("--eps", type=float, help="l_inf radius in pixel units (default: from the checkpoint)")
    p.add_argument("-n", "--num-points", type=int, default=100)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per point")
    from certdist.verification.settings import COMPLETE_METHODS, complete_help
    p.add_argument("--complete", default="auto", choices=list(COMPLETE_METHODS), help=complete_help())
    p.add_argument("--attack-steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--shard", default="0/1", help="i/n: certify the points with index %% n == i")
    p.add_argument("--max-dense-weights", type=int, default=None,
                   help="largest dense matrix for BaB/MILP (1: always branch and bound on the layer chain)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON-lines output (default: next to the checkpoint)")
    p.add_argument("--fresh", action="store_true", help="start a new output file instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from certdist.data import load
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    from certdist.verification import certify_dataset, format_summary

    args = parse_args(argv)
    model, payload = model_from_checkpoint(args.checkpoint)
    dataset = args.dataset or _from_config(payload, "data", "dataset")
    eps = args.eps if args.eps is not None else _from_config(payload, "eps")
    if dataset is None or eps is None:
        print("error: give --dataset and --eps (the checkpoint does not record them)", file=sys.stderr)
        return 2
    data = load(dataset, "test", data_dir=args.data_dir, limit=args.num_points)
    images, labels = data.images.float() / 255, data.labels.long()
    i, n = (int(v) for v in args.shard.split("/"))
    out = args.out or args.checkpoint.with_name(f"{args.checkpoint.stem}_certify_eps{eps:g}"
                                                f"{'' if n == 1 else f'_shard{i}of{n}'}.jsonl")
    if args.fresh and out.exists():
        out.unlink()
    print(f"checkpoint {args.checkpoint} ({model.arch}), dataset {dataset}, eps {eps:g}, {len(labels)} points, "
          f"timeout {args.timeout:g} s, complete={args.complete}, results -> {out}")
    start = time.monotonic()
    summary = certify_dataset(model, images, labels, ThreatModel(float(eps)), out, timeout=args.timeout,
                              limit=args.num_points, shard=(i, n), complete=args.complete,
                              attack_steps=args.attack_steps, restarts=args.restarts,
                              progress=not args.no_progress,
                              **({} if args.max_dense_weights is None else {"max_dense_weights": args.max_dense_weights}))
    print(format_summary(summary))
    print(f"IBP-only vs pipeline certified accuracy: {100 * summary['ibp_certified_accuracy']:.2f}% -> "
          f"{100 * summary['certified_accuracy']:.2f}%   (wall {time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
