"""``nn.Linear`` on inputs with more than one per-sample dimension ([N, C, H, W] with no Flatten before it,
[N, L, D] token-like inputs): it acts on the last dimension and adds its bias at every leading position.
Every bound (IBP, CROWN, CROWN-IBP, alpha-CROWN, the dense form, the float32 rounding bound) must hold at
sampled points and corners of the box, and the verifier must not call a point with a counterexample
verified."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certdist.propagation import alpha_crown, crown, crown_ibp, ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification import CertifyConfig, certify_point, dense_from_model, validate_counterexample
from certdist.verification.rounding import fp32_error_bound
from conftest import sample_box

TOL = 1e-9
METHODS = {
    "ibp": lambda net, x, th, **kw: ibp(net, x, th, C=kw.get("C")),
    "crown": lambda net, x, th, **kw: crown(net, x, th, **kw),
    "crown_best": lambda net, x, th, **kw: crown(net, x, th, intermediate="best", **kw),
    "crown_ibp": lambda net, x, th, **kw: crown_ibp(net, x, th, **kw),
    "alpha_crown": lambda net, x, th, **kw: alpha_crown(net, x, th, iterations=5, lr=0.3, **kw),
}


def _net(shape: tuple[int, ...], seed: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear -> ReLU on the last dimension of ``shape``, then Flatten and a head."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    positions = int(torch.Size(shape[:-1]).numel())
    net = nn.Sequential(nn.Linear(d, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(positions * 3, 4)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            if p.dim() == 1:
                p.mul_(2.0).add_(0.5)  # large biases: a bias counted once instead of per position shows
    return net.eval()


@pytest.mark.parametrize("shape", [(2, 3, 4), (6, 4)], ids=["NCHW", "NLD"])
@pytest.mark.parametrize("name", list(METHODS))
def test_bounds_contain_samples_and_corners(shape, name):
    net = _net(shape, seed=len(shape))
    g = torch.Generator().manual_seed(1)
    x = torch.rand((2, *shape), generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3])
    threat = ThreatModel(0.1)
    box = threat.box(x)
    for C in (None, margin_matrix(y, 4).double()):
        with torch.no_grad():
            out = METHODS[name](net, x, threat, C=C)
        for i in range(x.shape[0]):
            pts = sample_box(box.lower[i], box.upper[i], 2000, seed=i)
            with torch.no_grad():
                z = net(pts)
                v = z if C is None else z @ C[i].T
            assert torch.isfinite(out.lower[i]).all() and torch.isfinite(out.upper[i]).all()
            gap = torch.maximum(out.lower[i] - v, v - out.upper[i]).max().item()
            assert gap <= TOL, f"{name}: a sampled point lies {gap:.3g} outside the bounds"


@pytest.mark.parametrize("shape", [(2, 3, 4), (6, 4)], ids=["NCHW", "NLD"])
def test_dense_form_and_rounding_bound_on_nonflat_linear(shape):
    """The dense form computes the network (bias at every position) and the float32 rounding bound covers
    the float32 network's deviation from the float64 one."""
    net = _net(shape, seed=len(shape))
    x = torch.rand((64, *shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = dense_from_model(net, shape)
    with torch.no_grad():
        assert torch.allclose(dense.forward(x.flatten(1)), net(x), atol=1e-9)
        threat = ThreatModel(0.1)
        err = fp32_error_bound(net, threat.box(x))
        assert torch.isfinite(err).all() and err.shape == (64, 4)
        net32 = _net(shape, seed=len(shape)).float()
        pts = x.float()
        dev = (net32(pts).double() - net(pts.double())).abs()
        assert (dev <= err).all()


def _counterexample_net() -> nn.Sequential:
    """margin(x) = sum(x) - 1.5 for label 0 on x [1, 1, 2, 2]: the first Linear (on the last dimension)
    adds its bias -5 at both positions. Clean (x = 0.5) margin 0.5; at the corner x = 0.25 it is -0.5.
    A bias counted at one position only gives the margin +4.5 everywhere."""
    net = nn.Sequential(nn.Linear(2, 1), nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-5.0)
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([20.0, 0.0]))  # the ReLU stays active: 20 + sum(x) - 10 > 0
        net[4].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net[4].bias.copy_(torch.tensor([-11.5, 0.0]))
    return net.eval()


def test_certify_does_not_verify_a_point_with_a_counterexample():
    net = _counterexample_net()
    x = torch.full((1, 1, 2, 2), 0.5)
    threat = ThreatModel(0.25)
    corner = torch.full((1, 1, 2, 2), 0.25)
    assert validate_counterexample(net, corner, x, 0, threat)
    with torch.no_grad():
        assert float(net(x)[0, 0] - net(x)[0, 1]) == pytest.approx(0.5)
        low = crown(net.double(), x.double(), threat, y=torch.tensor([0])).lower
        net.float()
    assert float(low.min()) <= -0.5 + 1e-9
    for complete in ("none", "auto", "bab", "chain-bab"):  # no attack: only the bounds and the search decide
        cfg = CertifyConfig(timeout=10.0, complete=complete, attack_steps=0, apgd_restarts=0)
        rec = certify_point(net, x, 0, threat, cfg)
        assert rec["status"] == ("unknown" if complete == "none" else "falsified"), (complete, rec)
