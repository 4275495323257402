"""CROWN, CROWN-IBP and alpha-CROWN soundness: sampled points and box corners always lie inside the
bounds of the specification and of every ReLU's pre-activation."""
from __future__ import annotations

import pytest
import torch

from certdist.bounds import Interval
from certdist.propagation import alpha_crown, crown
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from conftest import frozen_batch_stats_copy, random_net, relu_inputs, sample_box

TOL = 1e-5
CASES = [("mlp", False), ("conv", False), ("conv_bn", False), ("conv_bn", True)]
METHODS = {
    "crown_ibp": lambda net, x, th, **kw: crown(net, x, th, intermediate="ibp", return_intermediate=True, **kw),
    "crown": lambda net, x, th, **kw: crown(net, x, th, intermediate="crown", return_intermediate=True, **kw),
    "crown_best": lambda net, x, th, **kw: crown(net, x, th, intermediate="best", return_intermediate=True, **kw),
    "alpha_crown": lambda net, x, th, **kw: alpha_crown(net, x, th, iterations=5, lr=0.3,
                                                        return_intermediate=True, **kw),
    "alpha_crown_opt": lambda net, x, th, **kw: alpha_crown(net, x, th, iterations=5, lr=0.3, return_intermediate=True,
                                                            optimize_intermediate=True, **kw),
}


def _setup(kind: str, bn_train: bool, seed: int, n: int = 4):
    net = random_net(kind, seed, bn_train=bn_train)
    spec = net.input_spec
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.rand((n, spec.channels, spec.size, spec.size), generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    oracle = frozen_batch_stats_copy(net, x) if bn_train else net.eval()
    return net, x, y, oracle


def _assert_inside(values: torch.Tensor, bounds: Interval, i: int, what: str) -> None:
    lo, up = bounds.lower[i], bounds.upper[i]
    assert torch.isfinite(lo).all() and torch.isfinite(up).all(), f"{what}: bounds are not finite"
    gap = torch.maximum(lo - values, values - up).max().item()
    assert gap <= TOL, f"{what}: a sampled point lies {gap:.3g} outside the bounds"


@pytest.mark.parametrize("kind,bn_train", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_contain_samples_and_corners(kind, bn_train, seed):
    """Every method, margin and identity specification: >= 1000 samples plus corners per input."""
    net, x, y, oracle = _setup(kind, bn_train, seed)
    threat = ThreatModel([0.03, 0.15][seed])
    K = net.num_classes
    with torch.no_grad():
        results = {name: (run(net, x, threat, batch_stats=bn_train), run(net, x, threat, y=y, batch_stats=bn_train))
                   for name, run in METHODS.items()}
    box = threat.box(x)
    for i in range(x.shape[0]):
        pts = sample_box(box.lower[i], box.upper[i], 1000, seed=i)
        with torch.no_grad():
            z = oracle(pts)
            acts = relu_inputs(oracle, pts)
        m = z @ margin_matrix(y[i:i + 1], K)[0].T
        for name, ((logits, pre), (margins, pre_m)) in results.items():
            _assert_inside(z, logits, i, f"{name} logits")
            _assert_inside(m, margins, i, f"{name} margins")
            for k, (a, p, q) in enumerate(zip(acts, pre, pre_m)):
                _assert_inside(a, p, i, f"{name} pre-activation of ReLU {k}")
                _assert_inside(a, q, i, f"{name} pre-activation of ReLU {k}")


@pytest.mark.parametrize("kind,bn_train", [("mlp", False), ("conv_bn", False), ("conv_bn", True)])
def test_split_constraints_from_branch_and_bound_are_sound(kind, bn_train):
    """Fixing unstable neurons active (l = 0) or inactive (u = 0), as BaB does, gives bounds that hold
    on the part of the box where the split holds; later layers are recomputed from the splits."""
    net, x, y, oracle = _setup(kind, bn_train, seed=3, n=3)
    threat = ThreatModel(0.2)
    with torch.no_grad():
        _, pre = crown(net, x, threat, intermediate="crown", return_intermediate=True, batch_stats=bn_train)
    first = pre[0]
    unstable = ((first.lower < 0) & (first.upper > 0)).flatten(1)
    assert unstable.any(), "test needs an unstable neuron"
    box = threat.box(x)
    for active in (True, False):
        lo, up = first.lower.flatten(1).clone(), first.upper.flatten(1).clone()
        j = unstable.float().argmax(1)  # one unstable neuron per sample (or neuron 0 when none)
        rows = torch.arange(x.shape[0])
        if active:
            lo[rows, j] = torch.where(unstable[rows, j], torch.zeros_like(lo[rows, j]), lo[rows, j])
        else:
            up[rows, j] = torch.where(unstable[rows, j], torch.zeros_like(up[rows, j]), up[rows, j])
        given = [Interval(lo.view_as(first.lower), up.view_as(first.upper))] + [None] * (len(pre) - 1)
        with torch.no_grad():
            out = crown(net, x, threat, y=y, intermediate="crown", intermediate_bounds=given, batch_stats=bn_train)
            out_a = alpha_crown(net, x, threat, y=y, iterations=3, intermediate_bounds=given,
                                batch_stats=bn_train)
        for i in range(x.shape[0]):
            pts = sample_box(box.lower[i], box.upper[i], 3000, seed=i)
            with torch.no_grad():
                keep = relu_inputs(oracle, pts)[0].flatten(1)[:, j[i]]
                keep = keep >= 0 if active else keep <= 0
                m = oracle(pts[keep]) @ margin_matrix(y[i:i + 1], net.num_classes)[0].T
            _assert_inside(m, out, i, "split crown")
            _assert_inside(m, out_a, i, "split alpha-crown")


def test_optimised_intermediate_bounds_fall_back_to_output_slopes_over_the_memory_budget():
    """Slopes for every intermediate neuron would exceed ``max_memory``: a warning, and the bounds of plain
    alpha-CROWN (output slopes only), not an out-of-memory crash."""
    net, x, y, _ = _setup("conv", False, 0, n=2)
    th = ThreatModel(0.1)
    with pytest.warns(RuntimeWarning, match="max_memory"):
        got = alpha_crown(net.eval(), x, th, y=y, iterations=3, optimize_intermediate=True, max_memory=20_000)
    want = alpha_crown(net.eval(), x, th, y=y, iterations=3, max_memory=20_000)
    assert torch.equal(got.lower, want.lower)
    full = alpha_crown(net.eval(), x, th, y=y, iterations=3, optimize_intermediate=True)  # fits the default
    base = crown(net.eval(), x, th, y=y)  # the first step is CROWN's slopes and bounds: never looser
    assert (full.lower >= base.lower - 1e-5).all()
