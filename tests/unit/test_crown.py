"""CROWN engine: layer rules against autograd, exactness on affine pieces, API behaviour, gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certdist.bounds import Interval, LinearBounds
from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.propagation import CROWN_RULES, IBP_RULES, alpha_crown, crown, crown_ibp, ibp
from certdist.propagation.crown import LayerContext, backward_rule_for
from certdist.propagation.ibp import batchnorm_affine
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from conftest import frozen_batch_stats_copy, random_net

ATOL = 2e-5


def _random_bn(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.weight.normal_()  # negative scales too
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2.0)
    return bn.eval()


AFFINE_LAYERS = [
    (nn.Linear(7, 5), (7,)),
    (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),  # output_padding 0
    (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 8, 8)),  # output_padding 1
    (nn.Conv2d(2, 4, 4, stride=3, padding=2, dilation=1), (2, 9, 10)),
    (nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2), (4, 9, 9)),
    (nn.Conv2d(3, 2, (3, 2), stride=(2, 1), padding=(0, 1), bias=False), (3, 7, 6)),
    (nn.AvgPool2d(2), (2, 5, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1), (2, 8, 8)),
    (Normalize([0.2, 0.4], [0.3, 0.9]), (2, 4, 4)),
    (nn.Flatten(), (2, 3, 3)),
    (_random_bn(nn.BatchNorm2d(2)), (2, 4, 4)),
    (_random_bn(nn.BatchNorm1d(7)), (7,)),
]


def _layer_id(v) -> str:
    return type(v).__name__ if isinstance(v, nn.Module) else str(v)


@pytest.mark.parametrize("layer,in_shape", AFFINE_LAYERS, ids=_layer_id)
@pytest.mark.parametrize("shared", [True, False])
def test_affine_rule_is_the_transposed_map(layer, in_shape, shared):
    """``A -> A J`` (vector-Jacobian product) and the bias ``<A, f(0)>``, for both bound sides."""
    torch.manual_seed(0)
    x = torch.randn(2, *in_shape, requires_grad=True)
    out = layer(x)
    A = torch.randn(2, 3, *out.shape[1:])
    affine = batchnorm_affine(layer, None) if isinstance(layer, nn.modules.batchnorm._BatchNorm) else None
    ctx = LayerContext(tuple(in_shape), affine)
    zero = torch.zeros(2, 3)
    lin = LinearBounds(A, zero, A, zero) if shared else LinearBounds(A, zero, -A, zero)
    with torch.no_grad():
        res = backward_rule_for(layer)(layer, lin, ctx)
    J = torch.stack([torch.autograd.grad((A[:, s] * layer(x)).sum(), x)[0] for s in range(3)], 1)
    with torch.no_grad():
        f0 = layer(torch.zeros(1, *in_shape))
    bias = (A * f0.unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close(res.lA, J, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(res.lb, bias, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(res.uA, J if shared else -J, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(res.ub, bias if shared else -bias, atol=ATOL, rtol=1e-5)


def test_every_ibp_layer_has_a_crown_rule():
    assert set(CROWN_RULES) == set(IBP_RULES)


def test_unknown_layer_raises():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"\(Tanh\): layer type Tanh is not supported"):  # the contract, up front
        crown(net, torch.rand(1, 4), ThreatModel(0.1))


def test_unsupported_layer_options_raise():
    net = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="not supported"):
        crown(net, torch.rand(1, 1, 3, 3), ThreatModel(0.1))


def _affine_only_net() -> CertifiableNet:
    torch.manual_seed(1)
    spec = InputSpec(2, 7, 4, (0.4, 0.5), (0.3, 0.6))
    feats = nn.Sequential(Normalize(spec.mean, spec.std), nn.Conv2d(2, 3, 3, stride=2, padding=1),
                          _random_bn(nn.BatchNorm2d(3)), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 6),
                          _random_bn(nn.BatchNorm1d(6)))
    return CertifiableNet(feats, nn.Linear(6, 4), "affine", spec).eval()


def _exact_range(fn, x: torch.Tensor, box: Interval, C: torch.Tensor) -> Interval:
    """Range of ``C fn(v)`` over the box for ``fn`` affine on it (its Jacobian at ``x``)."""
    lows, ups = [], []
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0))[0], x[i]).flatten(1)  # [K, n]
        W = C[i] @ J
        c0 = C[i] @ fn(x[i:i + 1])[0] + W @ (box.center[i] - x[i]).flatten()
        r = W.abs() @ box.radius[i].flatten()
        lows.append(c0 - r)
        ups.append(c0 + r)
    return Interval(torch.stack(lows), torch.stack(ups))


@pytest.mark.parametrize("mode", ["ibp", "crown", "best"])
def test_exact_without_relu(mode):
    net = _affine_only_net()
    x = torch.rand(3, 2, 7, 7)
    y = torch.tensor([0, 2, 3])
    threat = ThreatModel(0.1)
    for C in (margin_matrix(y, 4), torch.eye(4).expand(3, 4, 4)):
        exact = _exact_range(net, x, threat.box(x), C)
        with torch.no_grad():
            out = crown(net, x, threat, C=C, intermediate=mode)
            out_a = alpha_crown(net, x, threat, C=C, iterations=2, intermediate=mode)
        for o in (out, out_a):
            torch.testing.assert_close(o.lower, exact.lower, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(o.upper, exact.upper, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_bn"])
def test_exact_when_every_relu_is_stable(kind):
    net = random_net(kind, 5).eval()
    spec = net.input_spec
    torch.manual_seed(2)
    x = torch.rand(3, spec.channels, spec.size, spec.size)
    threat = ThreatModel(1e-6)
    C = torch.eye(spec.num_classes).expand(3, -1, -1)
    with torch.no_grad():
        out, pre = crown(net, x, threat, C=C, intermediate="crown", return_intermediate=True)
        out_ibp = crown_ibp(net, x, threat, C=C)
    assert all(((p.lower >= 0) | (p.upper <= 0)).all() for p in pre), "pick a smaller eps: a ReLU is unstable"
    exact = _exact_range(net, x, threat.box(x), C)
    for o in (out, out_ibp):
        torch.testing.assert_close(o.lower, exact.lower, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(o.upper, exact.upper, atol=ATOL, rtol=1e-5)


def test_zero_eps_collapses_to_forward():
    net = random_net("conv_bn", 3).eval()
    x = torch.rand(4, 3, 6, 6)
    with torch.no_grad():
        out = crown(net, x, ThreatModel(0.0), intermediate="crown")
        z = net(x)
    torch.testing.assert_close(out.lower, z, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out.upper, z, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind,bn_train", [("mlp", False), ("conv", False), ("conv_bn", False), ("conv_bn", True)])
def test_alpha_crown_never_looser_than_crown(kind, bn_train):
    for seed in range(3):
        net = random_net(kind, seed, bn_train=bn_train)
        spec = net.input_spec
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(4, spec.channels, spec.size, spec.size, generator=g)
        y = torch.randint(0, spec.num_classes, (4,), generator=g)
        threat = ThreatModel(0.1)
        with torch.no_grad():
            ref, pre = crown(net, x, threat, y=y, intermediate="crown", return_intermediate=True, batch_stats=bn_train)
            opt = alpha_crown(net, x, threat, y=y, iterations=8, intermediate_bounds=pre, batch_stats=bn_train)
        assert (opt.lower >= ref.lower - 1e-6).all() and (opt.upper <= ref.upper + 1e-6).all()


def test_train_mode_batchnorm_uses_the_clean_batch_statistics():
    """Train-mode BN with ``ref`` = the clean batch equals the eval-mode twin frozen at those statistics,
    also when only part of the batch is bounded."""
    net = random_net("conv_bn", 4, bn_train=True)
    x = torch.rand(6, 3, 6, 6)
    twin = frozen_batch_stats_copy(net, x)
    threat = ThreatModel(0.05)
    with torch.no_grad():
        for mode in ("ibp", "crown"):
            a = crown(net, x[:2], threat, ref=x, intermediate=mode, batch_stats=True)
            b = crown(twin, x[:2], threat, intermediate=mode)
            torch.testing.assert_close(a.lower, b.lower, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(a.upper, b.upper, atol=ATOL, rtol=1e-5)
    assert net.training and all(m.training for m in net.modules())


def test_default_specification_and_sides():
    net = random_net("conv", 0).eval()
    x = torch.rand(3, 2, 6, 6)
    y = torch.tensor([0, 4, 2])
    threat = ThreatModel(0.05)
    with torch.no_grad():
        logits = crown(net, x, threat)
        margins = crown(net, x, threat, y=y)
        explicit = crown(net, x, threat, C=margin_matrix(y, 5))
        lower_only = crown(net, x, threat, y=y, bound_upper=False)
        upper_only = crown(net, x, threat, y=y, bound_lower=False)
    assert logits.lower.shape == (3, 5) and margins.lower.shape == (3, 4)
    torch.testing.assert_close(margins.lower, explicit.lower)
    torch.testing.assert_close(lower_only.lower, margins.lower)
    torch.testing.assert_close(upper_only.upper, margins.upper)
    assert torch.isposinf(lower_only.upper).all() and torch.isneginf(upper_only.lower).all()
    assert (logits.lower <= logits.upper).all()


def test_bad_arguments_raise():
    net = random_net("mlp", 0).eval()
    x = torch.rand(2, 1, 3, 3)
    threat = ThreatModel(0.1)
    with pytest.raises(ValueError, match="specification C must have shape"):
        crown(net, x, threat, C=torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="unknown intermediate mode"):
        crown(net, x, threat, intermediate="lp")
    with pytest.raises(ValueError, match="one entry per ReLU"):
        crown(net, x, threat, intermediate_bounds=[None])
    with pytest.raises(ValueError, match="expected"):
        crown(net, x, threat, intermediate_bounds=[Interval.point(torch.zeros(2, 5)), None])
    with pytest.raises(ValueError, match="NaN"):
        crown(net, torch.full((1, 1, 3, 3), float("nan")), threat)


@pytest.mark.parametrize("mode", ["crown", "best"])
def test_chunking_gives_the_same_bounds(mode):
    net = random_net("conv_bn", 1).eval()
    x = torch.rand(3, 3, 6, 6)
    y = torch.tensor([0, 1, 2])
    threat = ThreatModel(0.1)
    with torch.no_grad():
        whole, pre = crown(net, x, threat, y=y, intermediate=mode, return_intermediate=True)
        tiny, pre_t = crown(net, x, threat, y=y, intermediate=mode, return_intermediate=True, max_memory=1)
        a = alpha_crown(net, x, threat, y=y, iterations=3, intermediate=mode)
        a_t = alpha_crown(net, x, threat, y=y, iterations=3, intermediate=mode, max_memory=1)
    for u, v in [(whole, tiny), (a, a_t)] + list(zip(pre, pre_t)):
        torch.testing.assert_close(u.lower, v.lower, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u.upper, v.upper, atol=1e-5, rtol=1e-5)


def test_best_intermediate_bounds_are_inside_ibp():
    net = random_net("conv_bn", 2).eval()
    x = torch.rand(4, 3, 6, 6)
    threat = ThreatModel(0.1)
    with torch.no_grad():
        _, pre_ibp = crown(net, x, threat, intermediate="ibp", return_intermediate=True)
        _, pre_best = crown(net, x, threat, intermediate="best", return_intermediate=True)
        _, pre_crown = crown(net, x, threat, intermediate="crown", return_intermediate=True)
    for i, b, c in zip(pre_ibp, pre_best, pre_crown):
        assert (b.lower >= i.lower - 1e-6).all() and (b.upper <= i.upper + 1e-6).all()
    # the first pre-activation is an affine image of the box: IBP and CROWN are both exact
    torch.testing.assert_close(pre_crown[0].lower, pre_ibp[0].lower)
    assert any((c.upper < i.upper - 1e-4).any() for i, c in zip(pre_ibp[1:], pre_crown[1:]))


@pytest.mark.parametrize("bn_train", [False, True])
def test_gradients_flow_through_crown_ibp(bn_train):
    net = random_net("conv_bn", 0, bn_train=bn_train)
    x = torch.rand(4, 3, 6, 6)
    y = torch.tensor([0, 1, 2, 3])
    out = crown_ibp(net, x, ThreatModel(0.05), y=y, bound_upper=False, batch_stats=bn_train)
    loss = nn.functional.cross_entropy(torch.cat([torch.zeros(4, 1), -out.lower], 1), torch.zeros(4, dtype=torch.long))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert all(m.weight.grad.abs().sum() > 0 for m in convs)


def test_alpha_crown_works_in_inference_mode_and_leaves_no_gradients():
    net = random_net("conv", 1).eval()
    x = torch.rand(2, 2, 6, 6)
    y = torch.tensor([1, 3])
    threat = ThreatModel(0.1)
    with torch.no_grad():
        expected = alpha_crown(net, x, threat, y=y, iterations=4)
    with torch.inference_mode():
        got = alpha_crown(net, x, threat, y=y, iterations=4)
        crown(net, x, threat, y=y, intermediate="crown")
    torch.testing.assert_close(got.lower, expected.lower)
    assert all(p.grad is None for p in net.parameters())
    assert not got.lower.requires_grad


def test_crown_intermediate_bounds_exact_before_the_first_relu():
    """Two mixing layers before the first ReLU: IBP is loose there, CROWN is the exact range."""
    torch.manual_seed(3)
    spec = InputSpec(1, 6, 3, (0.5,), (0.5,))
    feats = nn.Sequential(Normalize(spec.mean, spec.std), nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2),
                          nn.Flatten(), nn.ReLU(), nn.Linear(18, 5), nn.ReLU())
    net = CertifiableNet(feats, nn.Linear(5, 3), "two_mixing", spec).eval()
    x = torch.rand(2, 1, 6, 6)
    threat = ThreatModel(0.2)
    with torch.no_grad():
        _, pre = crown(net, x, threat, intermediate="crown", return_intermediate=True)
        _, pre_ibp = crown(net, x, threat, intermediate="ibp", return_intermediate=True)
    first = nn.Sequential(*list(feats)[:4])
    exact = _exact_range(first, x, threat.box(x), torch.eye(18).expand(2, -1, -1))
    torch.testing.assert_close(pre[0].lower, exact.lower, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(pre[0].upper, exact.upper, atol=ATOL, rtol=1e-5)
    assert (pre_ibp[0].upper > exact.upper + 1e-4).any()
