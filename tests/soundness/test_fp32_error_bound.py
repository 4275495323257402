"""The float32 rounding bound of :mod:`certdist.verification.rounding` against sampled float32 evaluations,
from IBP's activation ranges and from CROWN's (the pipeline uses the tighter one once CROWN ran)."""
from __future__ import annotations

import copy

import pytest
import torch

from certdist.bounds import Interval
from certdist.propagation import crown
from certdist.threats import ThreatModel
from certdist.verification.rounding import (_carry_back, exact_ranges, fp32_error_bound, fp32_margin_tolerance,
                                           margin_tolerance)
from certdist.specs import margin_matrix
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


@pytest.mark.parametrize("kind,seed", [("mlp", 0), ("mlp", 1), ("conv", 0), ("conv", 2), ("conv_bn", 0)])
def test_the_margin_tolerance_covers_sampled_float32_margins(kind, seed):
    """Per margin row, the errors carried back through the network bound the float32 margin's error at
    sampled points, and never exceed the forward recursion's ``|C| e``."""
    net, net64, box32, box64, pre = _case(kind, seed, 0.1)
    K = net.head.out_features
    C = torch.cat([margin_matrix(torch.tensor([y]), K) for y in range(K)], 1).double()  # every pair, both signs
    tol = fp32_margin_tolerance(net64, box64, C, input_slack=SLACK, relu_bounds=pre)
    old = margin_tolerance(fp32_error_bound(net64, box64, input_slack=SLACK, relu_bounds=pre), C)
    assert torch.isfinite(tol).all() and (tol <= old * (1 + 1e-12)).all()
    pts = sample_box(box32.lower[0], box32.upper[0], 3000, seed).float()
    with torch.no_grad():
        err = ((net(pts).double() - net64(pts.double())) @ C[0].T).abs()
    assert (err <= tol[0]).all(), (err - tol[0]).max()
    assert (err > tol[0] / 1000).any(), (err / tol[0]).max()  # the check can fail: the bound is not vacuous


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_bn"])
def test_carried_back_rows_are_the_networks_jacobian_where_every_relu_is_active(kind):
    """With every ReLU active on the box, no rounding and an input error ``s``, the carried-back bound of a
    row ``c`` is exactly ``s ||c J||_1`` (J the network's Jacobian): every layer's transpose is right."""
    net64 = copy.deepcopy(random_net(kind, 3).eval()).double()
    spec = net64.input_spec
    x = torch.rand(1, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0)).double()
    box = Interval(x - 1e-3, x + 1e-3)
    layers = layers_of(net64)
    with torch.no_grad():  # raise the biases before each ReLU, layer after layer, until it is active on the box
        for k, m in enumerate(layers):
            if isinstance(m, torch.nn.ReLU):
                low = exact_ranges(layers, box)[k - 1].lower[0]
                deficit = (2.0 - low).clamp(min=0)
                bias = layers[k - 1].bias
                bias.add_(deficit.flatten(1).amax(1) if deficit.dim() > 1 else deficit)
        ranges = exact_ranges(layers, box)
    ins = [box, *ranges[:-1]]
    for m, r in zip(layers, ins):
        if isinstance(m, torch.nn.ReLU):
            assert (r.lower > 1.0).all()  # the construction holds
    K = net64.head.out_features
    C = torch.randn(1, 3, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = 1e-3
    got = _carry_back(layers, len(layers), C, ins, [torch.zeros_like(r.lower) for r in ins], {}, s)
    K = net64.head.out_features
    J = torch.autograd.functional.jacobian(lambda t: net64(t).reshape(-1), x).reshape(K, -1)
    want = s * (C[0] @ J).abs().sum(1)
    assert torch.allclose(got[0], want, rtol=1e-10, atol=1e-12), (got, want)


def test_deep_networks_get_a_much_tighter_margin_tolerance():
    """Six layers: the forward recursion multiplies the error by |W| at every layer; carried back, the
    weights' cancellations count. The bound still covers sampled float32 margins."""
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [torch.nn.Linear(20 if i else 10, 20), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(20, 3)).eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(2.0)
                m.bias.mul_(100.0)  # large activations: rounding visible in float32
    net64 = copy.deepcopy(net).double()
    x = torch.rand(1, 10, dtype=torch.float64)
    box = Interval(x - 0.01, x + 0.01)
    _, pre = crown(net64, x, None, box=box, intermediate="crown", return_intermediate=True)
    C = margin_matrix(torch.tensor([0]), 3).double()
    tol = fp32_margin_tolerance(net64, box, C, input_slack=SLACK, relu_bounds=pre)
    old = margin_tolerance(fp32_error_bound(net64, box, input_slack=SLACK, relu_bounds=pre), C)
    assert (tol * 5 < old).all(), (tol, old)
    pts = sample_box(box.lower[0], box.upper[0], 3000, 0).float()
    with torch.no_grad():
        err = ((net(pts).double() - net64(pts.double())) @ C[0].T).abs()
    assert (err <= tol[0]).all(), (err - tol[0]).max()


@pytest.mark.parametrize("kind,seed", [("mlp", 0), ("mlp", 2), ("conv", 1), ("conv_bn", 0)])
def test_a_large_input_error_is_carried_through_the_relus_soundly(kind, seed):
    """The input error enters like any rounding error; at 0.05 it dominates, so the bound must cover
    ``|c . (f(x') - f(x))|`` for every ``x`` in the box and ``x'`` within 0.05 of it (float64, sampled
    pairs): a wrong ReLU rule (an error dropped where a ReLU passes it on) fails this."""
    net, net64, box32, box64, pre = _case(kind, seed, 0.1)
    K = net.head.out_features
    C = torch.cat([margin_matrix(torch.tensor([y]), K) for y in range(K)], 1).double()
    s = 0.05
    tol = fp32_margin_tolerance(net64, box64, C, input_slack=s, relu_bounds=pre)[0]
    x = sample_box(box64.lower[0], box64.upper[0], 300, seed)
    worst = torch.zeros_like(tol)
    for r in range(C.shape[1]):  # per row, x' = x + s sign(gradient): nearly the worst pair at each x
        xg = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad((net64(xg) @ C[0, r]).sum(), xg)
        for sign in (1.0, -1.0):
            with torch.no_grad():
                diff = ((net64(x + sign * s * grad.sign()) - net64(x)) @ C[0, r]).abs()
            assert (diff <= tol[r]).all(), (r, (diff - tol[r]).max())
            worst[r] = torch.maximum(worst[r], diff.max())
    assert (worst > tol / 50).any(), (worst / tol).max()  # (conv nets: most ReLUs unstable at this error)
