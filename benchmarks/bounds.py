"""Speed, memory and tightness of the bound engines: IBP, CROWN-IBP, CROWN, alpha-CROWN.

    PYTHONPATH=src python benchmarks/bounds.py [--batch 32] [--skip cnn7:crown cnn7:alpha_crown]
        [--models dm_small cnn7] [--alpha-iters 20] [--device cpu|cuda] [--timeout 600] [--suite 12]

Every (model, method) cell runs in a fresh subprocess so that its peak memory can be read in isolation:
on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); on CPU the growth of the process's peak
resident set size (``resource.getrusage(...).ru_maxrss`` at the end minus the resident size just
before the bound computation; allocator caching included, so an upper bound of what the tensors need).
Time: the best of ``--repeats`` runs (one run for the slow cells) after building the model.
Models are freshly IBP-initialised (untrained), inputs uniform in [0, 1], labels = the model's own
predictions; the margin lower bounds are therefore only comparable between methods, not with papers.
"train" rows: CROWN-IBP forward + backward of a loss in training mode (BatchNorm on batch statistics).

The last table is the "CROWN beats IBP" statistic on a suite of small random networks: the fraction of
margin lower bounds (sample x specification) where CROWN is tighter than IBP, where IBP is tighter, and
the mean difference; also for CROWN-IBP. Theory guarantees neither direction.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["ibp", "crown_ibp", "crown_ibp_train", "crown", "alpha_crown"]
DATASETS = {  # model -> (input spec args, eps)
    "dm_small": ((1, 28, 10, (0.1307,), (0.3081,)), 0.1),
    "cnn7": ((3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), 2 / 255),
}


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_cell(model_name: str, method: str, batch: int, alpha_iters: int, device: str, repeats: int,
             max_memory: int) -> dict:
    """One (model, method) measurement in this process (after an untimed warm-up on 2 samples)."""
    from certdist.models import InputSpec, build_model
    from certdist.propagation import alpha_crown, crown, ibp
    from certdist.specs import margin_matrix
    from certdist.threats import ThreatModel

    spec_args, eps = DATASETS[model_name]
    spec = InputSpec(*spec_args)
    torch.manual_seed(0)
    model = build_model(model_name, spec).to(device)
    x = torch.rand(batch, spec.channels, spec.size, spec.size, device=device)
    model.train()  # a few batches of BatchNorm statistics, so the eval-mode net is not trivial
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand_like(x))
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel(eps)
    C = margin_matrix(y, spec.num_classes)

    def call(x, C):
        if method == "crown_ibp_train":
            model.train()
            out = crown(model, x, threat, C=C, intermediate="ibp", bound_upper=False, max_memory=max_memory,
                        batch_stats=True)  # the training step: batch statistics
            loss = torch.nn.functional.softplus(-out.lower).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            model.eval()
            return out.lower.detach()
        with torch.no_grad():
            if method == "ibp":
                return ibp(model, x, threat, C=C).lower
            if method == "crown_ibp":
                return crown(model, x, threat, C=C, intermediate="ibp", bound_upper=False,
                             max_memory=max_memory).lower
            if method == "crown":
                return crown(model, x, threat, C=C, intermediate="crown", bound_upper=False,
                             max_memory=max_memory).lower
            if method == "alpha_crown":
                return alpha_crown(model, x, threat, C=C, iterations=alpha_iters, intermediate="crown",
                                   bound_upper=False, max_memory=max_memory).lower
        raise ValueError(method)

    if device == "cuda":
        call(x[:2], C[:2])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lower = call(x, C)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if times[-1] > 20:
            break
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()) - base
    return {"time_s": min(times), "peak_mb": peak / 2 ** 20, "margin_lb": lower.mean().item(),
            "verified": (lower.min(1).values > 0).float().mean().item()}


def crown_vs_ibp_suite(n_nets: int) -> list[dict]:
    """Compare margin lower bounds of IBP, CROWN-IBP and CROWN on small random networks."""
    from certdist.models import InputSpec, build_model
    from certdist.propagation import crown, ibp
    from certdist.specs import margin_matrix
    from certdist.threats import ThreatModel

    rows = []
    for arch, size in (("mlp", 8), ("dm_small", 16)):
        spec = InputSpec(1, size, 10, (0.5,), (0.5,))
        for eps in (0.005, 0.02, 0.1):
            stats = {"crown": [], "crown_ibp": []}
            for seed in range(n_nets):
                torch.manual_seed(seed)
                model = build_model(arch, spec, init="ibp" if seed % 2 else "default").eval()
                x = torch.rand(16, 1, size, size)
                with torch.no_grad():
                    C = margin_matrix(model(x).argmax(1), 10)
                    base = ibp(model, x, ThreatModel(eps), C=C).lower
                    for mode in stats:
                        inter = "ibp" if mode == "crown_ibp" else "crown"
                        out = crown(model, x, ThreatModel(eps), C=C, intermediate=inter, bound_upper=False).lower
                        stats[mode].append(out - base)
            for mode, diffs in stats.items():
                d = torch.cat([t.flatten() for t in diffs])
                rows.append({"arch": arch, "eps": eps, "method": mode, "n": d.numel(),
                             "tighter": (d > 1e-6).float().mean().item(),
                             "looser": (d < -1e-6).float().mean().item(),
                             "mean_gain": d.mean().item(), "median_gain": d.median().item()})
    return rows


def _measure(args: argparse.Namespace, model: str, method: str) -> str:
    """Run one cell in a fresh subprocess; its table columns (or why there are none)."""
    cmd = [sys.executable, __file__, "--worker", model, method, "--batch", str(args.batch),
           "--alpha-iters", str(args.alpha_iters), "--device", args.device, "--repeats", str(args.repeats),
           "--max-memory-gb", str(args.max_memory_gb)] + (["--tf32"] if args.tf32 else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"{'> ' + str(int(args.timeout)):>9}  (timed out)"
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1:]}"
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{r['time_s']:9.3f} {r['peak_mb']:11.1f} {r['margin_lb']:15.4f} {r['verified']:9.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--skip", nargs="*", default=[], help="cells to skip, as model:method or method")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--alpha-iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-memory-gb", type=float, default=2.0, help="chunking budget of the CROWN engine")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 convolutions on CUDA (default: off, exact fp32)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    ap.add_argument("--suite", type=int, default=12, help="random nets per setting in the CROWN-vs-IBP suite")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        torch.backends.cudnn.allow_tf32 = args.tf32
        print(json.dumps(run_cell(*args.worker, args.batch, args.alpha_iters, args.device, args.repeats,
                                  int(args.max_memory_gb * 2 ** 30))))
        return

    mem = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS growth (getrusage)"
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
          f"alpha_iters={args.alpha_iters} max_memory={args.max_memory_gb} GiB tf32={args.tf32} memory={mem}")
    print(f"{'model':<9} {'eps':>7} {'method':<16} {'time [s]':>9} {'peak [MiB]':>11} "
          f"{'mean margin lb':>15} {'verified':>9}")
    for model in args.models:
        for method in args.methods:
            head = f"{model:<9} {DATASETS[model][1]:7.4f} {method:<16}"
            if method in args.skip or f"{model}:{method}" in args.skip:
                print(f"{head} {'skipped':>9}")
                continue
            print(f"{head} {_measure(args, model, method)}", flush=True)

    if args.suite > 0:
        print(f"\nCROWN vs IBP margin lower bounds on random nets ({args.suite} nets x 16 inputs x 9 margins "
              "per row; half default init, half IBP init; gain = bound - IBP bound)")
        print(f"{'arch':<9} {'eps':>6} {'method':<10} {'tighter':>8} {'looser':>8} {'mean gain':>10} "
              f"{'median gain':>12}")
        for r in crown_vs_ibp_suite(args.suite):
            print(f"{r['arch']:<9} {r['eps']:6.3f} {r['method']:<10} {r['tighter']:8.2%} {r['looser']:8.2%} "
                  f"{r['mean_gain']:10.4f} {r['median_gain']:12.4f}")


if __name__ == "__main__":
    main()
