"""Every algorithm against every entry of the layer-support contract (:mod:`certdist.models.support`).

For each entry of :data:`SUPPORTED_LAYERS` a few configurations (tiny networks that contain it with the
options the contract allows) are run through every algorithm of :data:`ALGORITHMS`; each must run and be
sound: IBP / CROWN / CROWN-IBP / alpha-CROWN bounds and the dense form's CROWN bounds contain the network's
outputs at sampled points and corners of the box, the float32 rounding bound covers sampled float32
evaluations, the dense form equals the network, MILP's optimum is attained inside the box and lies below
every sample, BaB and chain-BaB never verify a threshold that the MILP's point violates, and the ONNX file's
numpy evaluator equals torch. A failure names the algorithm and the configuration (the test id).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from certdist.bounds import Interval
from certdist.models import Normalize
from certdist.models.support import ALGORITHMS, SUPPORTED_LAYERS, check_supported
from certdist.propagation import alpha_crown, crown, crown_ibp, ibp
from certdist.threats import ThreatModel
from certdist.verification import milp
from certdist.verification.bab import bab_verify
from certdist.verification.chain_bab import chain_bab_verify
from certdist.verification.dense import backward_lower, crown_bounds, dense_from_model
from certdist.interop import export_onnx, run_onnx
from certdist.verification.rounding import fp32_error_bound, fp32_margin_tolerance
from conftest import randomize_, sample_box

EPS = 0.15
SLACK = 1e-6  # float32 sampled points may lie ~3e-8 outside the float64 box


@dataclass(frozen=True)
class Config:
    """A tiny network containing one configuration of a contract entry."""
    entry: type
    name: str
    input_shape: tuple[int, ...]
    layers: Callable[[], list[nn.Module]]


def _cfg(entry, name, shape, layers):
    return Config(entry, name, shape, layers)


CONFIGS = [
    # Linear: flat, on [C, H, W] and [L, D] inputs (acts on the last dimension), without bias
    _cfg(nn.Linear, "flat", (1, 2, 2), lambda: [nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)]),
    _cfg(nn.Linear, "on-chw", (2, 3, 4), lambda: [nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(30, 4), nn.ReLU(),
                                                  nn.Linear(4, 3)]),
    _cfg(nn.Linear, "on-ld-no-bias", (3, 4), lambda: [nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2),
                                                      nn.ReLU(), nn.Flatten(), nn.Linear(6, 2)]),
    # Conv2d: padding, strides, non-square kernels and strides, dilation, no bias, two layers (patches path)
    _cfg(nn.Conv2d, "k3-pad1", (2, 4, 4), lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                                   nn.Linear(48, 3)]),
    _cfg(nn.Conv2d, "k3-stride2-pad1-deep", (1, 5, 5), lambda: [nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(),
                                                                nn.Conv2d(2, 3, 2, padding=1), nn.ReLU(), nn.Flatten(),
                                                                nn.Linear(48, 2)]),
    _cfg(nn.Conv2d, "nonsquare", (1, 4, 6), lambda: [nn.Conv2d(1, 2, (2, 3), stride=(1, 2), padding=(1, 0)), nn.ReLU(),
                                                     nn.Flatten(), nn.Linear(20, 3)]),
    _cfg(nn.Conv2d, "dilation2-no-bias", (1, 6, 5), lambda: [nn.Conv2d(1, 2, 3, dilation=2, padding=1, bias=False),
                                                             nn.ReLU(), nn.Conv2d(2, 2, 2), nn.ReLU(), nn.Flatten(),
                                                             nn.Linear(12, 3)]),
    # ReLU: plain and inplace after a computing layer
    _cfg(nn.ReLU, "inplace", (1, 2, 2), lambda: [nn.Flatten(), nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 4),
                                                 nn.ReLU(), nn.Linear(4, 2)]),
    # BatchNorm1d (eval mode, running statistics): on [C] and [C, L], without affine parameters
    _cfg(nn.BatchNorm1d, "flat", (1, 2, 2), lambda: [nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                                     nn.Linear(5, 3)]),
    _cfg(nn.BatchNorm1d, "on-cl", (3, 4), lambda: [nn.BatchNorm1d(3), nn.Linear(4, 3), nn.ReLU(), nn.Flatten(),
                                                   nn.Linear(9, 3)]),
    _cfg(nn.BatchNorm1d, "no-affine", (1, 2, 2), lambda: [nn.Flatten(), nn.Linear(4, 5),
                                                          nn.BatchNorm1d(5, affine=False), nn.ReLU(),
                                                          nn.Linear(5, 2)]),
    # BatchNorm2d
    _cfg(nn.BatchNorm2d, "conv-bn", (2, 4, 4), lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                                        nn.Conv2d(3, 2, 3, stride=2), nn.BatchNorm2d(2), nn.ReLU(),
                                                        nn.Flatten(), nn.Linear(2, 2)]),
    # AvgPool2d: default, padding with count_include_pad=True, non-square, count_include_pad=False without
    # padding, an input size the stride does not divide
    _cfg(nn.AvgPool2d, "k2", (1, 4, 4), lambda: [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                                 nn.Flatten(), nn.Linear(8, 3)]),
    _cfg(nn.AvgPool2d, "k3-s1-pad1", (1, 4, 4), lambda: [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                                                         nn.AvgPool2d(3, stride=1, padding=1), nn.ReLU(),
                                                         nn.Conv2d(2, 2, 2, stride=2), nn.ReLU(), nn.Flatten(),
                                                         nn.Linear(8, 3)]),
    _cfg(nn.AvgPool2d, "nonsquare", (1, 4, 5), lambda: [nn.Conv2d(1, 2, 2, padding=1), nn.ReLU(),
                                                        nn.AvgPool2d((2, 3), stride=(2, 1)), nn.Flatten(),
                                                        nn.Linear(2 * 2 * 4, 2)]),
    _cfg(nn.AvgPool2d, "no-count-pad0-odd", (1, 5, 5), lambda: [nn.Conv2d(1, 2, 1), nn.ReLU(),
                                                                nn.AvgPool2d(2, count_include_pad=False), nn.ReLU(),
                                                                nn.Flatten(), nn.Linear(8, 3)]),
    # Flatten(1, -1) on [C, H, W] and [C, L]
    _cfg(nn.Flatten, "chw", (2, 2, 2), lambda: [nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)]),
    _cfg(nn.Flatten, "cl", (2, 3), lambda: [nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)]),
    # Normalize on one and on three channels
    _cfg(Normalize, "3ch", (3, 3, 3), lambda: [Normalize((0.5, 0.4, 0.3), (0.3, 0.25, 0.2)), nn.Conv2d(3, 2, 2),
                                               nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)]),
    _cfg(Normalize, "1ch", (1, 3, 2), lambda: [Normalize((0.4,), (0.6,)), nn.Flatten(), nn.Linear(6, 4), nn.ReLU(),
                                               nn.Linear(4, 3)]),
]


@dataclass
class Case:
    cfg: Config
    net: nn.Sequential        # float32, eval mode
    net64: nn.Sequential      # its float64 copy
    x: torch.Tensor           # [2, *shape] float32
    threat: ThreatModel
    box64: Interval           # the box of x in float64: what the bound algorithms (given x in float64) bound
    box32: Interval           # the float32 box cast to float64: what the rounding bound and complete verifiers get

    def points(self, b: int, n: int = 150, box: Interval | None = None) -> torch.Tensor:
        box = box or self.box64
        return sample_box(box.lower[b], box.upper[b], n, seed=b)

    def outputs(self, pts: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net64(pts)


def _case(cfg: Config, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(*cfg.layers())
    assert any(type(m) is cfg.entry for m in net.modules()), cfg  # the configuration contains its entry
    randomize_(net, g, 0.7)
    for m in net.modules():  # keep Normalize as built (positive std)
        if isinstance(m, Normalize):
            m.std.abs_().add_(0.2)
    net.eval()
    x = torch.rand(2, *cfg.input_shape, generator=g)
    threat = ThreatModel(EPS)
    box = threat.box(x)
    return Case(cfg, net, copy.deepcopy(net).double(), x, threat, threat.box(x.double()),
                Interval(box.lower.double(), box.upper.double()))


def _contains(what: str, case: Case, lower: torch.Tensor, upper: torch.Tensor,
              f: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Every sampled output of point set ``b`` lies in ``[lower[b], upper[b]]`` (with a float64 tolerance)."""
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all(), f"{what}: non-finite bounds"
    for b in range(lower.shape[0]):
        pts = case.points(b)
        out = (f or case.outputs)(pts).reshape(pts.shape[0], -1)
        tol = 1e-9 * (1 + out.abs())
        lo, up = lower[b].reshape(1, -1), upper[b].reshape(1, -1)
        assert (out >= lo - tol).all(), f"{what}: an output below its lower bound by {(lo - out).max():.3g}"
        assert (out <= up + tol).all(), f"{what}: an output above its upper bound by {(out - up).max():.3g}"


# ---------------------------------------------------------------------------------------------------
# One check per algorithm.

def _propagation(name, fn):
    def check(case: Case, tmp_path) -> None:
        out = fn(case.net64, case.x.double(), case.threat)
        _contains(name, case, out.lower, out.upper)
    return check


def _alpha(case: Case, tmp_path) -> None:
    out = alpha_crown(case.net64, case.x.double(), case.threat, iterations=4, lr=0.3)
    _contains("alpha-crown", case, out.lower, out.upper)


def _rounding(case: Case, tmp_path) -> None:
    e = fp32_error_bound(case.net64, case.box32, input_slack=SLACK)
    assert torch.isfinite(e).all(), "rounding: non-finite error bound"
    for b in range(e.shape[0]):
        pts = case.points(b, 400, case.box32).float()
        with torch.no_grad():
            err = (case.net(pts).double() - case.net64(pts.double())).abs()
        assert (err <= e[b]).all(), f"rounding: float32 error {err.max():.3g} above its bound"
    # the per-row bound (errors carried back through the transposed layers): every logit and every
    # difference of two logits, with CROWN's pre-activation bounds deciding which ReLUs pass errors on
    K = e.shape[1]
    eye = torch.eye(K, dtype=torch.float64)
    rows = torch.cat([eye, (eye[:, None] - eye[None]).reshape(K * K, K)])
    C = rows.expand(e.shape[0], -1, -1)
    _, pre = crown(case.net64, case.x.double(), case.threat, intermediate="crown", return_intermediate=True)
    tol = fp32_margin_tolerance(case.net64, case.box32, C, input_slack=SLACK, relu_bounds=pre)
    assert torch.isfinite(tol).all(), "rounding: non-finite margin tolerance"
    assert (tol <= torch.einsum("bsk,bk->bs", C.abs(), e) * (1 + 1e-12)).all(), "rounding: looser than |C| e"
    for b in range(e.shape[0]):
        pts = case.points(b, 400, case.box32).float()
        with torch.no_grad():
            diff = case.net(pts).double() - case.net64(pts.double())
        err = (diff @ rows.T).abs()
        assert (err <= tol[b]).all(), f"rounding: float32 margin error {(err - tol[b]).max():.3g} above its bound"


def _dense(case: Case, tmp_path) -> None:
    dense = dense_from_model(case.net, case.cfg.input_shape)
    n = case.box64.lower.shape[0]
    lo, hi = case.box64.lower.reshape(n, -1), case.box64.upper.reshape(n, -1)
    for b in range(n):  # the dense form is the network
        pts = case.points(b)
        torch.testing.assert_close(dense.forward(pts.reshape(pts.shape[0], -1)), case.outputs(pts), rtol=1e-9,
                                   atol=1e-9, msg=lambda m: f"dense: the dense form differs from the network: {m}")
    lbs, ubs = crown_bounds(dense, lo, hi)  # its CROWN bounds of every pre-activation and of the logits
    for k in range(dense.num_relu_layers):
        _contains(f"dense CROWN (ReLU layer {k})", case, lbs[k], ubs[k],
                  lambda p, k=k: dense.preactivations(p.reshape(p.shape[0], -1))[k])
    K = dense.weights[-1].shape[0]
    eye = torch.eye(K, dtype=torch.float64).expand(n, K, K)
    low = backward_lower(dense, dense.num_relu_layers, torch.cat([eye, -eye], 1), lbs, ubs, lo, hi).lower
    _contains("dense CROWN (logits)", case, low[:, :K], -low[:, K:])


def _margin_problem(case: Case):
    """The dense form over point 0's box, its CROWN bounds and the margin row ``e_0 - e_1``."""
    dense = dense_from_model(case.net, case.cfg.input_shape)
    lo, hi = case.box64.lower[:1].reshape(1, -1), case.box64.upper[:1].reshape(1, -1)
    lbs, ubs = crown_bounds(dense, lo, hi)
    K = dense.weights[-1].shape[0]
    c = torch.zeros(K, dtype=torch.float64)
    c[0], c[1] = 1.0, -1.0
    return dense, lo, hi, lbs, ubs, c


def _exact_min(case: Case) -> tuple[float, torch.Tensor]:
    """The MILP minimum of the margin ``e_0 - e_1`` over point 0's box and its minimiser, checked: attained
    inside the box, and no sample below it."""
    dense, lo, hi, lbs, ubs, c = _margin_problem(case)
    form = milp.build(dense, lo[0].numpy(), hi[0].numpy(), [l[0].numpy() for l in lbs], [u[0].numpy() for u in ubs])
    row = milp.solve_row(form, dense, c.numpy(), 20.0)
    assert row.x is not None and row.value is not None and np.isfinite(row.lower), f"milp: not solved ({row})"
    xm = torch.from_numpy(row.x)
    assert (xm >= lo[0] - 1e-9).all() and (xm <= hi[0] + 1e-9).all(), "milp: the optimum lies outside the box"
    at = float(c @ case.outputs(xm.view(1, *case.cfg.input_shape))[0])
    assert abs(at - row.value) <= 1e-6 * (1 + abs(at)), f"milp: objective {row.value} but the network gives {at}"
    samples = case.outputs(case.points(0, 400)) @ c
    assert row.lower <= float(samples.min()) + 1e-7 * (1 + float(samples.abs().max())), \
        f"milp: proved lower bound {row.lower} above a sampled margin {float(samples.min())}"
    return row.value, xm


def _milp(case: Case, tmp_path) -> None:
    m, _ = _exact_min(case)
    dense, lo, hi, lbs, ubs, c = _margin_problem(case)
    up, down = _gaps(m)
    res = milp.milp_verify(dense, lo[0], hi[0], c[None], [l[0] for l in lbs], [u[0] for u in ubs], 10.0,
                           _checker(case, c, up), tol=up)
    assert res.status == "falsified", f"milp: threshold above the exact minimum not falsified ({res.status})"
    res = milp.milp_verify(dense, lo[0], hi[0], c[None], [l[0] for l in lbs], [u[0] for u in ubs], 10.0,
                           _checker(case, c, down), tol=down)
    assert res.status == "verified", f"milp: threshold below the exact minimum not verified ({res.status})"


def _checker(case: Case, c: torch.Tensor, threshold: float):
    """A counterexample check: the point (flat) if its float64 margin is at most ``threshold``."""
    def check(flat: torch.Tensor):
        p = flat.to(torch.float64).view(1, *case.cfg.input_shape)
        return p if float(case.outputs(p)[0] @ c) <= threshold else None
    return check


def _gaps(m: float) -> tuple[float, float]:
    """Thresholds just above the exact minimum ``m`` (violated by the MILP's point: must not be verified)
    and clearly below it (must be verified: the searches are complete on these tiny networks)."""
    return m + 1e-4 * (1 + abs(m)), m - 3e-2 * (1 + abs(m))


def _bab(case: Case, tmp_path) -> None:
    m, _ = _exact_min(case)
    dense, lo, hi, lbs, ubs, c = _margin_problem(case)
    up, down = _gaps(m)
    above = bab_verify(dense, lo[0], hi[0], c[None], 5.0, _checker(case, c, up), tol=up)
    assert above.status != "verified", "bab: verified a threshold that the MILP optimum violates"
    below = bab_verify(dense, lo[0], hi[0], c[None], 10.0, _checker(case, c, down), tol=down)
    assert below.status == "verified" and below.lower <= m + 1e-7 * (1 + abs(m)), \
        f"bab: {below.status}, lower {below.lower} vs exact minimum {m}"


def _chain_bab(case: Case, tmp_path) -> None:
    m, _ = _exact_min(case)
    _, _, _, _, _, c = _margin_problem(case)
    up, down = _gaps(m)
    x0 = case.x[:1]  # chain BaB bounds threat.box(x0 in float64): box64 of point 0, as the MILP
    above = chain_bab_verify(case.net, x0, case.threat, c[None], 5.0, _checker(case, c, up), threshold=up)
    assert above.status != "verified", "chain-bab: verified a threshold that the MILP optimum violates"
    below = chain_bab_verify(case.net, x0, case.threat, c[None], 10.0, _checker(case, c, down), threshold=down)
    assert below.status == "verified" and below.lower <= m + 1e-7 * (1 + abs(m)), \
        f"chain-bab: {below.status}, lower {below.lower} vs exact minimum {m}"


def _onnx(case: Case, tmp_path) -> None:
    import onnx
    path = export_onnx(case.net, tmp_path / "net.onnx", case.cfg.input_shape)  # checked against torch inside
    proto = onnx.load(str(path))
    for b in range(case.x.shape[0]):
        pts = case.points(b)
        got = torch.from_numpy(run_onnx(proto, pts.float().numpy()))
        torch.testing.assert_close(got, case.outputs(pts.float().double()), rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"onnx: the numpy evaluator differs from torch: {m}")


CHECKS: dict[str, Callable[[Case, object], None]] = {
    "ibp": _propagation("ibp", lambda net, x, th: ibp(net, x, th)),
    "crown": _propagation("crown", lambda net, x, th: crown(net, x, th, intermediate="crown")),
    "crown-ibp": _propagation("crown-ibp", lambda net, x, th: crown_ibp(net, x, th)),
    "alpha-crown": _alpha,
    "rounding": _rounding,
    "dense": _dense,
    "milp": _milp,
    "bab": _bab,
    "chain-bab": _chain_bab,
    "onnx": _onnx,
}
# Known gaps, each with its reason (strict=False: XPASS once fixed; then delete the entry). Empty: the CROWN
# nn.Linear rule on non-flat inputs (bias summed over the leading positions) is fixed.
XFAIL: dict[tuple[str, str], str] = {}


def test_every_contract_entry_has_a_configuration_and_every_algorithm_a_check():
    assert {c.entry for c in CONFIGS} == set(SUPPORTED_LAYERS), "a contract entry without a test configuration"
    assert set(CHECKS) == set(ALGORITHMS), "an algorithm without a check"


def _rule_tables() -> dict[str, Callable[[type], bool]]:
    """Per rule table: does it have a rule for a layer type (as its algorithm looks it up). Every
    :class:`~certdist.models.support.LayerRules` table is in ``RULE_TABLES`` once its module is imported."""
    import certdist.interop.onnx_export  # noqa: F401 - fills RULE_TABLES
    import certdist.propagation  # noqa: F401
    import certdist.verification.dense  # noqa: F401
    import certdist.verification.rounding  # noqa: F401
    from certdist.models.describe import LAYERS
    from certdist.models.support import RULE_TABLES, WEIGHTED_LAYERS
    assert {"ibp", "crown", "rounding", "dense", "onnx"} <= set(RULE_TABLES)
    tables = {name: (lambda table: lambda t: table.find(t) is not None)(table)
              for name, table in RULE_TABLES.items()}
    described = {cls for cls, _ in LAYERS.values()}
    tables["describe (models/describe.py LAYERS)"] = lambda t: t in described
    tables["init/L1 (WEIGHTED_LAYERS)"] = lambda t: not SUPPORTED_LAYERS[t].weighted or t in WEIGHTED_LAYERS
    return tables


def test_every_algorithm_has_a_rule_for_every_contract_entry():
    """The registries every algorithm reads: one rule per contract entry; a failure names each table that
    lacks one and the layer types it lacks."""
    missing = {name: [t.__name__ for t in SUPPORTED_LAYERS if not has(t)] for name, has in _rule_tables().items()}
    missing = {name: kinds for name, kinds in missing.items() if kinds}
    assert not missing, "no rule for: " + "; ".join(f"{name}: {', '.join(k)}" for name, k in missing.items())


def test_every_configuration_passes_the_contract():
    for cfg in CONFIGS:
        net = nn.Sequential(*cfg.layers())
        check_supported(net, cfg.input_shape)
        with torch.no_grad():
            assert net(torch.rand(2, *cfg.input_shape)).dim() == 2, cfg  # [B, K] logits


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.entry.__name__}-{c.name}")
def test_every_algorithm_is_sound_on_every_contract_entry(cfg, algorithm, tmp_path, request):
    key = (f"{cfg.entry.__name__}-{cfg.name}", algorithm)
    if key in XFAIL:
        request.applymarker(pytest.mark.xfail(reason=XFAIL[key], strict=False))
    case = _case(cfg)
    try:
        CHECKS[algorithm](case, tmp_path)
    except AssertionError as e:
        raise AssertionError(f"{algorithm} on {cfg.entry.__name__} ({cfg.name}): {e}") from None
    except Exception as e:  # a missing rule: name the algorithm and the entry
        raise AssertionError(f"{algorithm} has no working rule for {cfg.entry.__name__} ({cfg.name}): "
                             f"{type(e).__name__}: {e}") from e
