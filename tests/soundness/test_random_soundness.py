"""Randomised end-to-end soundness of the certify pipeline (issue 10).

Small random networks (MLPs and CNNs with eval-mode BatchNorm, AvgPool, padding and strides, dead and
always-active ReLUs, logits offset by ~1000 so that float32 rounding matters), inputs with pixels at
exactly 0 and 1, and eps within a hair of each point's exact robust radius, computed by a float64 MILP
that minimises eps. The pipeline must never answer ``verified`` where a float32 counterexample exists
(searched by dense sampling, corners, PGD and the radius MILP's own witness point and its neighbours),
and every ``falsified`` must carry a counterexample that ``validate_counterexample`` accepts.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from certdist.attacks.pgd import pgd
from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.threats import ThreatModel
from certdist.verification import CertifyConfig, certify_point, dense_from_model, validate_counterexample
from certdist.verification import milp
from conftest import randomize_
from certdist.verification.dense import crown_bounds

NUM_NETS = 200


def _random_net(k: int, g: torch.Generator) -> CertifiableNet:
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    bn = r(0, 1) == 1
    if k % 2 == 0:  # MLP
        c, s = r(1, 2), r(2, 3)
        n = c * s * s
        feats: list[nn.Module] = [nn.Flatten()]
        for _ in range(r(1, 2)):
            w = r(3, 8)
            feats += [nn.Linear(n, w), *([nn.BatchNorm1d(w)] if bn else []), nn.ReLU()]
            n = w
    else:  # CNN
        c, s = r(1, 2), r(4, 5)
        k1, st, pad = r(2, 3), r(1, 2), r(0, 1)
        o = r(2, 4)
        feats = [nn.Conv2d(c, o, k1, stride=st, padding=pad), *([nn.BatchNorm2d(o)] if bn else []), nn.ReLU()]
        hw = (s + 2 * pad - k1) // st + 1
        if hw >= 2 and r(0, 1):
            feats.append(nn.AvgPool2d(2, stride=r(1, 2)))
            hw = (hw - 2) // feats[-1].stride + 1
        n = o * hw * hw
        w = r(3, 6)
        feats += [nn.Flatten(), nn.Linear(n, w), nn.ReLU()]
        n = w
    classes = r(2, 4)
    spec = InputSpec(c, s, classes, tuple(torch.rand(c, generator=g).tolist()),
                     tuple((torch.rand(c, generator=g) + 0.3).tolist()))
    net = CertifiableNet(nn.Sequential(Normalize(spec.mean, spec.std), *feats), nn.Linear(n, classes),
                         "test_random", spec)
    randomize_(net, g, 0.8, var_min=0.3)
    with torch.no_grad():
        linears = [m for m in net.layers() if isinstance(m, nn.Linear)]
        for m, nxt in zip(linears, linears[1:]):
            if m.out_features >= 3:
                m.bias[0] = -50.0  # dead everywhere
                m.bias[1] = 50.0   # active everywhere (or dead, after a BatchNorm of negative scale) ...
                nxt.weight[:, 1] *= 0.02  # ... without drowning the other neurons
        net.head.bias.add_([0.0, 1e3, 1e4, 0.0][k % 4])  # float32 rounding of the logits: ~6e-5, ~1e-3
    return net.eval()


def _attack_cap(net: CertifiableNet, x: torch.Tensor, y: int, g: torch.Generator) -> float:
    """An eps at which PGD finds a float32 counterexample (an upper bound of the radius, up to rounding);
    1.0 (the whole data range) when it finds none."""
    for eps in (0.03, 0.1, 0.3, 0.7):
        threat = ThreatModel(eps)
        adv = pgd(net, x, torch.tensor([y]), threat, steps=10, restarts=1, loss="margin", generator=g)
        if validate_counterexample(net, adv, x, y, threat):
            return eps
    return 1.0


def _radius(net: CertifiableNet, x: torch.Tensor, y: int, cap: float) -> tuple[float, np.ndarray | None]:
    """Exact (float64 MILP) smallest eps <= ``cap`` at which some class ties with ``y``, and the point
    attaining it; (inf, None) when there is none (or HiGHS does not solve it within its time limit)."""
    import highspy
    dense = dense_from_model(net, tuple(x.shape[1:]))
    box = ThreatModel(cap).box(x.double())
    lo, hi = box.lower.view(1, -1), box.upper.view(1, -1)
    lbs, ubs = crown_bounds(dense, lo, hi)
    x0 = x.flatten().double().numpy()
    best, arg = float("inf"), None
    W, b = dense.weights[-1].numpy(), dense.biases[-1].numpy()
    for j in range(W.shape[0]):
        if j == y:
            continue
        form = milp.build(dense, lo[0].numpy(), hi[0].numpy(), [l[0].numpy() for l in lbs], [u[0].numpy() for u in ubs])
        h, n0 = form.highs, form.n_inputs
        e = h.getNumCol()
        h.addVar(0.0, cap)
        h.changeColCost(e, 1.0)
        for i in range(n0):  # |x_i - x0_i| <= eps
            h.addRow(-highspy.kHighsInf, x0[i], 2, np.array([i, e], dtype=np.int32), np.array([1.0, -1.0]))
            h.addRow(x0[i], highspy.kHighsInf, 2, np.array([i, e], dtype=np.int32), np.array([1.0, 1.0]))
        coef = W[y] - W[j]  # margin_j(x) = coef . a + (b_y - b_j) <= 0
        h.addRow(-highspy.kHighsInf, -(b[y] - b[j]), len(form.out_cols), form.out_cols.astype(np.int32), coef)
        h.setOptionValue("time_limit", 1.0)
        h.run()
        if h.getModelStatus() == highspy.HighsModelStatus.kOptimal:
            val = h.getInfo().objective_function_value
            if val < best:
                best, arg = val, np.array(h.getSolution().col_value[:n0])
    return best, arg


def _float32_counterexample(net, x, y, threat, witness, g) -> torch.Tensor | None:
    """Dense sampling, corners, PGD and the radius witness with its neighbours, all in float32."""
    box = threat.box(x)
    u = torch.rand(600, *x.shape[1:], generator=g)
    corners = torch.where(torch.rand(200, *x.shape[1:], generator=g) < 0.5, box.lower, box.upper)
    pts = [box.lower + u * (box.upper - box.lower), corners]
    if witness is not None:
        w = torch.from_numpy(witness).float().view_as(x)
        jitter = (torch.rand(300, *x.shape[1:], generator=g) - 0.5) * 1e-4
        pts += [w, w + jitter, w + jitter * 1e-2]
    pts.append(pgd(net, x, torch.tensor([y]), threat, steps=20, restarts=2, loss="margin", generator=g))
    pts = threat.project(torch.cat(pts), x.expand(sum(p.shape[0] for p in pts), *x.shape[1:]))
    with torch.no_grad():  # a batch may round differently from one point: re-check the near ties one by one
        out = net(pts)
        margin = out[:, y] - out.scatter(1, torch.full((len(out), 1), y), -float("inf")).max(1).values
        near = torch.nonzero(margin < 1e-3 * (1 + out[:, y].abs())).flatten()
    for i in near[torch.argsort(margin[near])].tolist():
        if validate_counterexample(net, pts[i:i + 1], x, y, threat, tol=0.0):
            return pts[i:i + 1]
    return None


@pytest.mark.slow
def test_no_wrong_verified_on_random_networks_near_the_robust_radius():
    g = torch.Generator().manual_seed(2026)
    counts = {"verified": 0, "falsified": 0, "unknown": 0, "misclassified": 0}
    stages: dict[str, int] = {}
    start = time.monotonic()
    for k in range(NUM_NETS):
        net = _random_net(k, g)
        spec = net.input_spec
        x = torch.rand(1, spec.channels, spec.size, spec.size, generator=g)
        x[torch.rand(x.shape, generator=g) < 0.25] = 0.0
        x[torch.rand(x.shape, generator=g) < 0.25] = 1.0
        with torch.no_grad():
            y = int(net(x).argmax(1))
        cap = _attack_cap(net, x, y, g)  # radius <= cap (up to rounding): bounds the MILP's box
        radius, witness = _radius(net, x, y, cap * 1.01 + 1e-6) if cap < 1.0 else (float("inf"), None)
        if not radius < 1.0:  # robust on the whole data range (or the MILP timed out): a verification case
            radius = 0.5
        eps = radius * float([0.97, 1 - 1e-4, 1 - 1e-5, 1 - 1e-7, 1.0, 1 + 1e-6, 1.03][k % 7])
        if eps <= 0:
            eps = 1e-3
        threat = ThreatModel(eps)
        cfg = CertifyConfig(timeout=0.5, complete=["auto", "bab", "milp"][k % 3], attack_steps=10, restarts=1,
                            alpha_iterations=3, bab_alpha_steps=3, seed=k)
        rec = certify_point(net, x, y, threat, cfg, index=k)
        counts[rec["status"]] += 1
        stages[f"{rec['status']}/{rec['stage']}"] = stages.get(f"{rec['status']}/{rec['stage']}", 0) + 1
        if rec["status"] == "falsified":
            cex = torch.tensor(rec["counterexample"]).unsqueeze(0)
            assert validate_counterexample(net, cex, x, y, threat), (k, rec)
        elif rec["status"] == "verified":
            cex = _float32_counterexample(net, x, y, threat, witness, g)
            assert cex is None, (k, eps, radius, rec, cex)
    elapsed = time.monotonic() - start
    print(f"{NUM_NETS} networks in {elapsed:.1f} s: {counts} {stages}")
    assert counts["verified"] >= 30 and counts["falsified"] >= 30, (counts, stages)


# --- random architectures: IBP / CROWN / alpha-CROWN bounds against samples and corners (fast) --------

NUM_ARCHS = 24


def _r(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _random_arch(k: int, g: torch.Generator) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A random chain of the contract's layers: non-square inputs and kernels, strides, dilation, padding,
    eval-mode BatchNorm1d/2d, the supported AvgPool2d variants, Linear on non-flat inputs, 2-4 classes."""
    c, h, w = _r(g, 1, 2), _r(g, 3, 6), _r(g, 3, 6)
    layers: list[nn.Module] = []
    if _r(g, 0, 1):
        layers.append(Normalize(torch.rand(c, generator=g).tolist(), (torch.rand(c, generator=g) + 0.2).tolist()))
    shape = (c, h, w)
    if k % 3 != 2:  # a convolutional part
        kh, kw = _r(g, 1, min(3, h)), _r(g, 1, min(3, w))
        d = 2 if (_r(g, 0, 3) == 0 and 2 * (kh - 1) + 1 <= h and 2 * (kw - 1) + 1 <= w) else 1
        st = (_r(g, 1, 2), _r(g, 1, 2))
        pad = (_r(g, 0, kh // 2), _r(g, 0, kw // 2))
        o = _r(g, 2, 3)
        layers.append(nn.Conv2d(c, o, (kh, kw), stride=st, padding=pad, dilation=d, bias=bool(_r(g, 0, 3))))
        shape = (o, (h + 2 * pad[0] - d * (kh - 1) - 1) // st[0] + 1, (w + 2 * pad[1] - d * (kw - 1) - 1) // st[1] + 1)
        if _r(g, 0, 1):
            layers.append(nn.BatchNorm2d(o))
        layers.append(nn.ReLU())
        ph, pw = min(2, shape[1]), min(2, shape[2])
        variant = _r(g, 0, 3)
        if variant == 1 and ph * pw > 1:  # plain, possibly non-square
            layers.append(nn.AvgPool2d((ph, pw), stride=(_r(g, 1, 2), _r(g, 1, 2))))
        elif variant == 2 and shape[1] >= 3 and shape[2] >= 3:  # padding, counted (count_include_pad=True)
            layers.append(nn.AvgPool2d(3, stride=_r(g, 1, 2), padding=1))
        elif variant == 3 and ph * pw > 1:  # count_include_pad=False without padding
            layers.append(nn.AvgPool2d((ph, pw), count_include_pad=False))
        if variant and layers[-1].__class__ is nn.AvgPool2d:
            m = layers[-1]
            kk, ss, pp = m.kernel_size, m.stride, m.padding
            kk, ss, pp = [(v, v) if isinstance(v, int) else tuple(v) for v in (kk, ss, pp)]
            shape = (shape[0], *((shape[1 + i] + 2 * pp[i] - kk[i]) // ss[i] + 1 for i in range(2)))
    if _r(g, 0, 1):  # Linear on the non-flat [C, H, W] activation: acts on the last dimension
        out = _r(g, 2, 4)
        layers += [nn.Linear(shape[2], out), nn.ReLU()]
        shape = (*shape[:2], out)
    layers.append(nn.Flatten())
    n = shape[0] * shape[1] * shape[2]
    for _ in range(_r(g, 1, 2)):
        width = _r(g, 3, 8)
        layers.append(nn.Linear(n, width))
        if _r(g, 0, 1):
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        n = width
    layers.append(nn.Linear(n, _r(g, 2, 4)))
    net = nn.Sequential(*layers)
    randomize_(net, g, 0.8, var_min=0.3)
    return net.eval(), (c, h, w)


def _first_mixing(net: nn.Sequential) -> int:
    return next(i for i, m in enumerate(net) if isinstance(m, (nn.Conv2d, nn.Linear)))


@torch.no_grad()
def _corner_units(net: nn.Sequential, box, g: torch.Generator, margin: float) -> torch.Tensor:
    """Make some units of the first mixing layer dead except near one corner of ``box``: their bias is
    lowered until their maximum over the box (IBP is exact for one affine layer) is ``margin``. Returns
    those corners (one per adjusted unit and sample), where the units are active."""
    from certdist.propagation.ibp import propagate
    i = _first_mixing(net)
    m = net[i]
    prefix = list(net)[:i + 1]
    corners = []
    for b in range(box.lower.shape[0]):
        sub = type(box)(box.lower[b:b + 1], box.upper[b:b + 1])
        up = propagate(prefix, sub).upper[0]  # [out, ...]
        unit = int(torch.randint(0, m.out_features if isinstance(m, nn.Linear) else m.out_channels, (1,), generator=g))
        peak = up[..., unit] if isinstance(m, nn.Linear) else up[unit]
        if m.bias is None or b > 0:
            pos = torch.nonzero(peak == peak.max())[0].tolist()
        else:
            m.bias[unit] -= float(peak.max()) - margin
            up = propagate(prefix, sub).upper[0]
            peak = up[..., unit] if isinstance(m, nn.Linear) else up[unit]
            pos = torch.nonzero(peak == peak.max())[0].tolist()
        with torch.enable_grad():  # the maximising corner: the sign pattern of the unit's gradient
            x = ((sub.lower + sub.upper) / 2).clone().requires_grad_()
            out = torch.nn.Sequential(*prefix)(x)[0]
            sel = out[(Ellipsis, *pos[:-1], unit)] if isinstance(m, nn.Linear) and out.dim() > 1 else (
                out[unit] if isinstance(m, nn.Linear) else out[(unit, *pos)])
            if sel.dim():
                sel = sel.flatten()[0]
            (grad,) = torch.autograd.grad(sel, x)
        corners.append(torch.where(grad >= 0, sub.upper, sub.lower))
    return torch.cat(corners)


def test_random_architectures_bounds_contain_samples_and_corners():
    """IBP, CROWN (full, best), CROWN-IBP and alpha-CROWN on random architectures of the contract's layers,
    with units dead except in a corner of the box and activations scaled up to ~1e8: every bound contains
    the network's outputs at sampled points, random corners and the corners that wake those units."""
    from certdist.models.support import check_supported
    from certdist.propagation import alpha_crown, crown, crown_ibp, ibp
    from conftest import sample_box
    g = torch.Generator().manual_seed(7)
    start = time.monotonic()
    woken = 0
    for k in range(NUM_ARCHS):
        net, shape = _random_arch(k, g)
        check_supported(net, shape)
        net = net.double()
        scale = 10.0 ** [0, 2, 4, 8][k % 4]  # the first mixing layer's weights: activations up to ~1e8
        with torch.no_grad():
            net[_first_mixing(net)].weight.mul_(scale)
            if net[_first_mixing(net)].bias is not None:
                net[_first_mixing(net)].bias.mul_(scale)
        x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
        x[:, :, 0, 0] = 0.0  # pixels at the ends of the data range
        x[:, :, -1, -1] = 1.0
        threat = ThreatModel([0.02, 0.1, 0.3][k % 3])
        box = threat.box(x)
        corners = _corner_units(net, box, g, margin=1e-3 * scale)
        bounds = {"ibp": ibp(net, x, threat), "crown": crown(net, x, threat),
                  "crown-best": crown(net, x, threat, intermediate="best"), "crown-ibp": crown_ibp(net, x, threat),
                  "alpha-crown": alpha_crown(net, x, threat, iterations=3, lr=0.3),
                  "alpha-crown-opt": alpha_crown(net, x, threat, iterations=3, lr=0.3, optimize_intermediate=True)}
        for b in range(2):
            pts = torch.cat([sample_box(box.lower[b], box.upper[b], 200, seed=k), corners[b:b + 1]])
            with torch.no_grad():
                out = net(pts)
                first = torch.nn.Sequential(*list(net)[:_first_mixing(net) + 1])(corners[b:b + 1])
            woken += int((first > 0).any())
            for name, iv in bounds.items():
                lo, up = iv.lower[b], iv.upper[b]
                assert torch.isfinite(lo).all() and torch.isfinite(up).all(), (k, name)
                tol = 1e-9 * (1 + torch.maximum(lo.abs(), up.abs()))
                assert (out >= lo - tol).all(), (k, name, net, float((lo - out).max()))
                assert (out <= up + tol).all(), (k, name, net, float((out - up).max()))
        tol = 1e-9 * (1 + bounds["crown"].lower.abs())  # alpha-CROWN starts from CROWN's slopes: never looser
        assert (bounds["alpha-crown"].lower >= bounds["crown"].lower - tol).all(), k
        assert (bounds["alpha-crown-opt"].lower >= bounds["crown"].lower - tol).all(), k
    assert woken >= NUM_ARCHS, woken  # the corner units are awake at their corners (the check can fail)
    assert time.monotonic() - start < 60
