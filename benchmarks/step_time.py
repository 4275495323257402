"""Time one training step of every method and print the ratio to a standard step.

    python benchmarks/step_time.py                       # DM-small/MNIST and CNN7/CIFAR-10 shapes
    python benchmarks/step_time.py --nets dm_small --methods standard ibp cc-ibp --steps 20
    python benchmarks/step_time.py --nets dm_small --methods standard ibp crown-ibp --threads 1 --kernels

Random inputs of the dataset's shape (timing does not depend on the pixel values). The step is the
real one: ``compute_loss`` of the training loop + backward + Adam, at the full training eps (after
the ramp, so the regulariser is off) and, with --distill, a frozen teacher of the same architecture.

``--kernels`` adds, from torch.profiler over 3 more steps, the time per step spent inside convolution
and matrix-multiply kernels (forward and backward: their share of the profiled time times the median
step time), and that time over the standard step's total: the floor that no elementwise fusion can go
under without changing what is computed.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from certdist.config import load_config
from certdist.models import InputSpec, build_model
from certdist.training.objective import StepContext, Teacher, compute_loss

SHAPES = {"dm_small": (InputSpec(1, 28, 10, (0.1307,), (0.3081,)), 256, 0.1),
          "cnn7": (InputSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), 128, 2 / 255)}
METHODS = ["standard", "pgd-at", "ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "cc-dist"]


GEMM_OPS = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution_backward", "aten::mm", "aten::bmm",
            "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward", "aten::slow_conv_transpose2d", "aten::cudnn_convolution")


def gemm_share(prof) -> float:
    """The share of the profiled CPU time spent in convolution / matrix-multiply ops (self times, so nested
    calls count once). Scaled by the unprofiled step time, it gives their time without profiler overhead."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / max(total, 1e-9)


def time_method(net: str, method: str, steps: int, warmup: int, batch: int | None, compile_: bool,
                kernels: bool = False) -> tuple[float, float | None]:
    """(median step time, with ``kernels`` the part of it inside convolution / matmul kernels, else None)."""
    spec, default_batch, eps = SHAPES[net]
    b = batch or default_batch
    torch.manual_seed(0)
    model = build_model(net, spec).train()
    teacher = None
    overrides = [f"eps={eps}", f"batch_size={b}", "attack.steps=1"]
    if method == "pgd-at":
        overrides += ["attack.steps=10", "attack.step_size=0.25"]
    if method == "cc-dist":
        teacher_model = copy.deepcopy(model).eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        teacher = Teacher(teacher_model)
        n = (warmup + steps) * b
        teacher.cache = torch.zeros(n, model.feature_dim)
        teacher.cached = torch.zeros(n, dtype=torch.bool)
        method_name = "cc-ibp"
    else:
        method_name = method
    cfg = load_config(None, overrides + [f"method={method_name}"])
    ctx = StepContext(eps=eps, eps_final=eps, reg_scale=0.0, crown_beta=1.0)
    run_model = torch.compile(model) if compile_ else model
    if compile_:
        run_model.features, run_model.head = model.features, model.head  # attribute access for bounds
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(b, spec.channels, spec.size, spec.size)
    y = torch.randint(0, spec.num_classes, (b,))
    times = []
    for i in range(warmup + steps):
        # with the cache, the teacher runs in the first epoch only: emulate later epochs by
        # reusing the indices of the warm-up steps
        idx = torch.arange(b) + (i % max(warmup, 1)) * b
        t0 = time.perf_counter()
        loss, _ = compute_loss(cfg, model, x, y, ctx, teacher, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    if not kernels:
        return median, None
    reps = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(reps):
            idx = torch.arange(b) + (i % max(warmup, 1)) * b
            loss, _ = compute_loss(cfg, model, x, y, ctx, teacher, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return median, median * gemm_share(prof)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=["dm_small", "cnn7"], choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["standard", "pgd-at", "ibp", "cc-ibp", "cc-dist"],
                    choices=METHODS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--kernels", action="store_true",
                    help="also the time per step inside convolution / matmul kernels (torch.profiler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    extra = " conv+matmul ms | conv+matmul / standard |" if args.kernels else ""
    print("| net | batch | method | step ms | / standard | / cc-ibp |" + extra)
    print("|---|---|---|---|---|---|" + ("---|---|" if args.kernels else ""))
    for net in args.nets:
        base = {}
        methods = args.methods if "standard" in args.methods else ["standard", *args.methods]
        for m in methods:
            t, k = time_method(net, m, args.steps, args.warmup, args.batch, compile_=False, kernels=args.kernels)
            base[m] = t
            ratio_cc = f"{t / base['cc-ibp']:.2f}" if "cc-ibp" in base else "-"
            cols = f" {1000 * k:.1f} | {k / base['standard']:.2f} |" if k is not None else ""
            print(f"| {net} | {args.batch or SHAPES[net][1]} | {m} | {1000 * t:.1f} | {t / base['standard']:.2f} | "
                  f"{ratio_cc} |{cols}", flush=True)


if __name__ == "__main__":
    main()
