"""Complete verifiers against each other and against exhaustive search on tiny networks.

BaB and the MILP must give the same verdict on every (point, eps); a verified point must have no
misclassified point on a dense grid of its box (2-D inputs) nor under many-restart PGD; every
counterexample must be valid (inside the box and the data range, misclassified by the torch model).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certdist.attacks.pgd import margin_loss, pgd
from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification.bab import bab_verify
from certdist.verification.certify import validate_counterexample
from certdist.verification.dense import count_unstable, crown_bounds, dense_from_model
from certdist.verification.milp import milp_verify

EPS = (0.02, 0.06, 0.12, 0.25)


def tiny_net(seed: int, dims: int = 2, widths=(16, 12), classes: int = 3, train: bool = False,
             scale: float = 1.0) -> CertifiableNet:
    """An MLP on ``dims`` inputs (shape [dims, 1, 1]), weights scaled by ``scale``; ``train``: 150 Adam
    steps on synthetic regions."""
    torch.manual_seed(seed)
    spec = InputSpec(dims, 1, classes, (0.5,) * dims, (0.3,) * dims)
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std), nn.Flatten()]
    n = dims
    for w in widths:
        layers += [nn.Linear(n, w), nn.ReLU()]
        n = w
    net = CertifiableNet(nn.Sequential(*layers), nn.Linear(n, classes), "tiny", spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    if train:
        X = torch.rand(512, dims, 1, 1)
        Y = ((X[:, 0, 0, 0] > 0.5).long() + (X[:, 1, 0, 0] > X[:, 0, 0, 0]).long()) % classes
        opt = torch.optim.Adam(net.parameters(), 0.02)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
    return net.eval()


def _grid(lo: torch.Tensor, hi: torch.Tensor, n: int = 81) -> torch.Tensor:
    t = torch.linspace(0, 1, n)
    a, b = torch.meshgrid(t, t, indexing="ij")
    u = torch.stack([a.flatten(), b.flatten()], 1)
    return (lo.flatten() + u * (hi - lo).flatten()).view(-1, 2, 1, 1)


def _decide(net, dense, x, y, eps, method):
    threat = ThreatModel(eps)
    box = threat.box(x)
    lo, hi = box.lower.flatten().double(), box.upper.flatten().double()
    C = margin_matrix(torch.tensor([y]), net.num_classes)[0]

    def check(flat):
        cand = threat.project(flat.float().view_as(x), x)
        return cand if validate_counterexample(net, cand, x, y, threat) else None

    if method == "bab":
        return bab_verify(dense, lo, hi, C, 20.0, check, batch=32, alpha_steps=5)
    lbs, ubs = crown_bounds(dense, lo.view(1, -1), hi.view(1, -1))
    return milp_verify(dense, lo, hi, C, [l[0] for l in lbs], [u[0] for u in ubs], 20.0, check)


@pytest.mark.parametrize("seed,train", [(0, False), (1, True)])
def test_bab_milp_agree_and_match_dense_grid(seed, train):
    net = tiny_net(seed, train=train)
    dense = dense_from_model(net, (2, 1, 1))
    g = torch.Generator().manual_seed(10 + seed)
    seen = set()
    for _ in range(4):
        x = torch.rand(1, 2, 1, 1, generator=g)
        with torch.no_grad():
            y = int(net(x).argmax(1))
        for eps in EPS:
            bab, milp = _decide(net, dense, x, y, eps, "bab"), _decide(net, dense, x, y, eps, "milp")
            assert bab.status == milp.status, (eps, bab, milp)
            assert bab.status in ("verified", "falsified")
            seen.add(bab.status)
            box = ThreatModel(eps).box(x)
            with torch.no_grad():
                grid = net(_grid(box.lower, box.upper))
            grid_wrong = bool((grid.argmax(1) != y).any())
            if bab.status == "verified":
                assert not grid_wrong
                true_min = float(margin_loss(grid, torch.full((grid.shape[0],), y)).neg().min())
                assert milp.lower <= true_min + 1e-4 and bab.lower <= true_min + 1e-4
            for res in (bab, milp):
                if res.status == "falsified":
                    assert validate_counterexample(net, res.counterexample, x, y, ThreatModel(eps))
    assert seen == {"verified", "falsified"}


def test_bab_milp_agree_with_attack_on_deeper_net():
    """3 ReLU layers, 30 ReLUs, 5-D inputs: same verdicts, and many-restart PGD never breaks a proof."""
    net = tiny_net(3, dims=5, widths=(10, 10, 10), classes=4, scale=3.0)
    dense = dense_from_model(net, (5, 1, 1))
    g = torch.Generator().manual_seed(7)
    statuses = set()
    for _ in range(3):
        x = torch.rand(1, 5, 1, 1, generator=g)
        with torch.no_grad():
            y = int(net(x).argmax(1))
        for eps in (0.02, 0.08):
            bab, milp = _decide(net, dense, x, y, eps, "bab"), _decide(net, dense, x, y, eps, "milp")
            assert bab.status == milp.status, (eps, bab, milp)
            statuses.add(bab.status)
            if bab.status == "verified":
                threat = ThreatModel(eps)
                yt = torch.tensor([y])
                for loss in ("margin", "ce"):
                    adv = pgd(net, x, yt, threat, steps=30, restarts=10, loss=loss,
                              generator=torch.Generator().manual_seed(1))
                    assert not validate_counterexample(net, adv, x, y, threat)
    assert "verified" in statuses and "falsified" in statuses


def test_milp_min_margin_is_exact_on_1d_net():
    """On a net with a scalar input, the MILP's optimum equals the minimum over a fine grid."""
    net = tiny_net(5, dims=2, widths=(8, 8))
    dense = dense_from_model(net, (2, 1, 1))
    x = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1)
    lo = torch.tensor([0.3, 0.6], dtype=torch.float64)
    hi = torch.tensor([0.5, 0.6], dtype=torch.float64)  # second input fixed: a 1-D problem
    y = int(net(x).argmax(1))
    C = margin_matrix(torch.tensor([y]), 3)[0]
    lbs, ubs = crown_bounds(dense, lo.view(1, -1), hi.view(1, -1))
    res = milp_verify(dense, lo, hi, C, [l[0] for l in lbs], [u[0] for u in ubs], 10.0, lambda _: None)
    t = torch.linspace(0.3, 0.5, 20001, dtype=torch.float64)
    pts = torch.stack([t, torch.full_like(t, 0.6)], 1)
    grid_min = float((dense.forward(pts) @ C.double().T).min())
    exact = min(r.lower if r.status == "verified" else r.value for r in res.rows)
    assert abs(exact - grid_min) < 1e-4


def test_dense_crown_bounds_are_sound_and_count_unstable():
    net = tiny_net(2, dims=2)
    dense = dense_from_model(net, (2, 1, 1))
    lo, hi = torch.tensor([[0.2, 0.3]], dtype=torch.float64), torch.tensor([[0.5, 0.45]], dtype=torch.float64)
    lbs, ubs = crown_bounds(dense, lo, hi)
    pts = _grid(lo.float(), hi.float(), 41).flatten(1).double()
    for k, z in enumerate(dense.preactivations(pts)[:-1]):
        assert (z >= lbs[k] - 1e-9).all() and (z <= ubs[k] + 1e-9).all()
    assert 0 <= count_unstable(lbs, ubs) <= sum(dense.widths)


def test_candidates_failing_the_recheck_are_never_reported():
    """A falsifiable box whose candidates are all rejected by ``check`` ends as unknown, not falsified."""
    net = tiny_net(1, train=True)
    dense = dense_from_model(net, (2, 1, 1))
    x = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    y = int(net(x).argmax(1))
    lo, hi = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)  # the whole square
    C = margin_matrix(torch.tensor([y]), 3)[0]
    lbs, ubs = crown_bounds(dense, lo.view(1, -1), hi.view(1, -1))
    rejected = []
    reject = lambda p: rejected.append(p) and None  # noqa: E731
    res = milp_verify(dense, lo, hi, C, [l[0] for l in lbs], [u[0] for u in ubs], 10.0, reject)
    assert res.status == "unknown" and res.counterexample is None and rejected
    res = bab_verify(dense, lo, hi, C, 1.0, reject, batch=16, alpha_steps=2)
    assert res.status == "unknown" and res.counterexample is None
