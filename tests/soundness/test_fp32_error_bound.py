"""The float32 rounding bound of :mod:`certdist.verification.rounding` against sampled float32 evaluations,
from IBP's activation ranges and from CROWN's (the pipeline uses the tighter one once CROWN ran)."""
from __future__ import annotations

import copy

import pytest
import torch

from certdist.bounds import Interval
from certdist.propagation import crown
from certdist.threats import ThreatModel
from certdist.verification.rounding import exact_ranges, fp32_error_bound
from certdist.propagation.crown import layers_of

from conftest import random_net, sample_box

SLACK = 1e-6  # the sampled float32 points may round up to ~3e-8 outside the float64 box


def _case(kind: str, seed: int, eps: float):
    net = random_net(kind, seed).eval()
    with torch.no_grad():
        net.head.bias.add_(torch.tensor([0.0, 1e3, -3e3, 1e4, 0.0][: net.head.out_features]))  # rounding matters
    net64 = copy.deepcopy(net).double()
    spec = net.input_spec
    x = torch.rand(1, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))
    threat = ThreatModel(eps)
    box32 = threat.box(x)
    box64 = Interval(box32.lower.double(), box32.upper.double())
    _, pre = crown(net64, x.double(), threat, intermediate="crown", return_intermediate=True)
    return net, net64, box32, box64, pre


@pytest.mark.parametrize("kind,seed", [("mlp", 0), ("mlp", 1), ("conv", 0), ("conv", 2), ("conv_bn", 0)])
def test_the_error_bound_covers_sampled_float32_evaluations_with_either_range(kind, seed):
    net, net64, box32, box64, pre = _case(kind, seed, 0.1)
    e_ibp = fp32_error_bound(net64, box64, input_slack=SLACK)
    e_crown = fp32_error_bound(net64, box64, input_slack=SLACK, relu_bounds=pre)
    assert torch.isfinite(e_crown).all()
    assert (e_crown <= e_ibp).all()  # every term of the recursion is monotone in the ranges
    pts = sample_box(box32.lower[0], box32.upper[0], 3000, seed).float()
    with torch.no_grad():
        err = (net(pts).double() - net64(pts.double())).abs()
    assert (err <= e_crown).all(), (err - e_crown).max()
    # the check can fail: the bound is within 100x of observed errors, so an unsound rule that shrinks it
    # 100x fails it
    assert (err > e_crown / 100).any(), (err / e_crown).max()


def test_crown_ranges_tighten_the_bound_somewhere_and_stay_inside_ibp():
    """On a conv net at a large eps CROWN proves neurons inactive that IBP leaves unstable: their error
    is zeroed, so the bound drops; every range stays inside IBP's."""
    tighter = 0
    for seed in range(4):
        net, net64, box32, box64, pre = _case("conv", seed, 0.3)
        layers = layers_of(net64)
        ibp_r, crown_r = exact_ranges(layers, box64), exact_ranges(layers, box64, pre)
        for a, b in zip(ibp_r, crown_r):
            assert (b.lower >= a.lower).all() and (b.upper <= a.upper).all() and (b.lower <= b.upper).all()
        e_ibp = fp32_error_bound(net64, box64, input_slack=SLACK)
        e_crown = fp32_error_bound(net64, box64, input_slack=SLACK, relu_bounds=pre)
        tighter += int((e_crown < e_ibp * 0.999).any())
    assert tighter >= 2
