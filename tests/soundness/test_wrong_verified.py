"""The six ways issue 10 found to get a wrong ``verified`` (each answered ``verified`` before the fix although
a counterexample exists that :func:`validate_counterexample` accepts on the eval-mode float32 model)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.threats import ThreatModel
from certdist.verification import (CertifyConfig, certify_dataset, certify_point, dense_from_model, eval_copy,
                                   read_records, validate_counterexample)
from certdist.verification.bab import bab_verify
from certdist.verification.dense import crown_bounds
from certdist.verification import milp
from certdist.verification.milp import milp_verify

from conftest import random_net, self_labelled_points

QUIET = dict(progress=False, timeout=10.0, attack_steps=0, restarts=1)


def _net(widths: list[int], n_in: int, n_out: int, seed: int, bn: nn.Module | None = None) -> CertifiableNet:
    g = torch.Generator().manual_seed(seed)
    spec = InputSpec(n_in, 1, n_out, (0.0,) * n_in, (1.0,) * n_in)
    feats: list[nn.Module] = [Normalize(spec.mean, spec.std), nn.Flatten()]
    n = n_in
    for w in widths:
        feats += [nn.Linear(n, w), *([bn] if bn is not None else []), nn.ReLU()]
        n = w
    net = CertifiableNet(nn.Sequential(*feats), nn.Linear(n, n_out), "test_mlp", spec)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.eval()


# --- case 1: float32 gap in the bound stages ------------------------------------------------------

def _tie_net() -> CertifiableNet:
    net = _net([], 2, 2, 0)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0 + 2.0 ** -20, 1.0]]))
        net.head.bias.copy_(torch.tensor([1000.0, 1000.0]))
    return net


def test_float32_tie_is_not_verified_by_the_bound_stages(tmp_path):
    net = _tie_net()
    x = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    threat = ThreatModel(0.25)
    corner = torch.tensor([0.5, 0.0]).view(1, 2, 1, 1)
    assert validate_counterexample(net, corner, x, 1, threat)  # float32 logits tie: (1000.5, 1000.5)
    verdicts = []
    for batched in (True, False):
        out = tmp_path / f"b{batched}.jsonl"
        certify_dataset(net, x, torch.tensor([1]), threat, out, batched_ibp=batched, progress=False, attack_steps=20)
        (rec,) = read_records(out)
        verdicts.append((rec["status"], rec["stage"]))
        assert rec["status"] != "verified", rec
    assert verdicts[0] == verdicts[1] == ("falsified", "attack-quick")  # the pre-pass keeps the verdict


def test_evaluate_counts_ibp_certified_as_the_pipeline_does():
    """``evaluate``'s IBP-certified accuracy needs the margins proved above the float32 tolerance: the tie
    net's float32 IBP lower bound is positive (~5e-7), yet its float32 logits tie at a corner of the box."""
    from certdist.evaluation import evaluate
    net = _tie_net()
    x = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1)
    res = evaluate(net, x, torch.tensor([1]), ThreatModel(0.25), progress=False, attack=False)
    assert res["clean_acc"] == 100.0 and res["ibp_cert_acc"] == 0.0
    # a clear margin is still counted
    res = evaluate(net, x, torch.tensor([1]), ThreatModel(0.001), progress=False, attack=False)
    assert res["ibp_cert_acc"] == 100.0


def test_the_box_tolerance_of_the_counterexample_check_is_covered():
    """validate_counterexample accepts points up to 1e-6 outside the box: the tolerance covers them."""
    net = _net([], 1, 2, 0)
    x, threat = torch.full((1, 1, 1, 1), 0.6), ThreatModel(0.1)
    lower = float(threat.box(x).lower)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[0.0], [1000.0]]))
        net.head.bias.copy_(torch.tensor([0.0, -(1000.0 * lower - 5e-4)]))  # margin 5e-4 at the box's edge
    outside = torch.full((1, 1, 1, 1), lower - 0.9e-6)
    assert validate_counterexample(net, outside, x, 1, threat)
    for complete in ("milp", "bab"):
        rec = certify_point(net, x, 1, threat, CertifyConfig(timeout=3, complete=complete, attack_steps=5))
        assert rec["status"] != "verified", rec


# --- case 2: float32 gap in complete verification -------------------------------------------------

def _min_margin(net: CertifiableNet, x: torch.Tensor, threat: ThreatModel, y: int) -> milp.RowResult:
    """The exact (float64 MILP) minimum of ``logit_y - logit_other`` over the box."""
    dense = dense_from_model(net, tuple(x.shape[1:]))
    box = threat.box(x)
    lo, hi = box.lower.double().view(1, -1), box.upper.double().view(1, -1)
    lbs, ubs = crown_bounds(dense, lo, hi)
    c = torch.zeros(1, 2, dtype=torch.float64)
    c[0, y], c[0, 1 - y] = 1, -1
    res = milp_verify(dense, lo[0], hi[0], c, [l[0] for l in lbs], [u[0] for u in ubs], 20.0, lambda _: None)
    return res.rows[0]


def _near_tie_mlp(seed: int, gap: float):
    """A random 2-8-8-2 MLP, logits offset by ~1000, whose exact minimum margin over the box is ~``gap``
    (the float32 bias rounds it by up to 3e-5)."""
    net = _net([8, 8], 2, 2, seed)
    x = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    threat = ThreatModel(0.3)
    with torch.no_grad():
        y = int(net(x).argmax(1))
        net.head.bias.add_(1000.0)
        net.head.bias[y] += gap - _min_margin(net, x, threat, y).lower
    return net, x, threat, y, _min_margin(net, x, threat, y)


@pytest.mark.parametrize("complete", ["bab", "milp"])
@pytest.mark.parametrize("seed", [1, 6])
def test_float32_gap_in_complete_verification(complete, seed):
    net, x, threat, y, exact = _near_tie_mlp(seed, 1e-5)
    assert 0 < exact.lower < 3e-5  # robust in exact arithmetic ...
    g = torch.linspace(-1e-3, 1e-3, 101)
    offsets = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).view(-1, 2, 1, 1)
    grid = torch.from_numpy(exact.x).float().view(1, 2, 1, 1) + offsets
    with torch.no_grad():
        assert (net(threat.project(grid, x)).argmax(1) != y).any()  # ... but not in float32
    cfg = CertifyConfig(timeout=20, complete=complete, attack_steps=0, restarts=1, alpha_iterations=5)
    rec = certify_point(net, x, y, threat, cfg, dense=dense_from_model(net, (2, 1, 1)))
    assert rec["status"] in ("unknown", "falsified") and rec["stage"] == complete, rec
    if rec["status"] == "falsified":
        assert validate_counterexample(net, torch.tensor(rec["counterexample"]).unsqueeze(0), x, y, threat)


# --- case 3: BatchNorm without running statistics -------------------------------------------------

def test_batchnorm_without_running_statistics_is_refused_everywhere(tmp_path):
    from certdist.propagation.alpha import alpha_crown
    from certdist.propagation.crown import crown
    from certdist.propagation.ibp import ibp
    from certdist.interop import export_onnx
    net = _net([4], 2, 2, 1, bn=nn.BatchNorm1d(4, track_running_stats=False))
    x = torch.full((1, 2, 1, 1), 0.5)
    threat = ThreatModel(0.1)
    cfg = CertifyConfig(timeout=5, attack_steps=0)
    for call in (lambda: certify_point(net, x, 0, threat, cfg),
                 lambda: certify_dataset(net, x, torch.tensor([0]), threat, tmp_path / "r.jsonl", progress=False),
                 lambda: export_onnx(net, tmp_path / "n.onnx", (2, 1, 1)),
                 lambda: dense_from_model(net, (2, 1, 1)),
                 lambda: ibp(net, x, threat), lambda: crown(net, x, threat),
                 lambda: alpha_crown(net, x, threat, iterations=2)):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            call()
    assert not (tmp_path / "r.jsonl").exists() or not read_records(tmp_path / "r.jsonl")
    net.train()  # training bounds with batch statistics stay available (asked for explicitly)
    ibp(net, torch.rand(4, 2, 1, 1), threat, batch_stats=True)


# --- case 4: HiGHS failures are not proofs --------------------------------------------------------

def test_infeasible_program_is_unknown_not_verified():
    """Pre-activation bounds that exclude the network's real values make the program infeasible: a
    numerical failure of the bounds or of HiGHS, never a proof."""
    net = _net([3], 2, 2, 2)
    dense = dense_from_model(net, (2, 1, 1))
    lo, hi = np.zeros(2), np.ones(2)
    z = dense.preactivations(torch.zeros(1, 2, dtype=torch.float64))[0][0].numpy()
    wrong = np.abs(z) + 5.0  # stable active with l = u = |z| + 5: no input reaches it
    form = milp.build(dense, lo, hi, [wrong], [wrong])
    row = milp.solve_row(form, dense, np.array([1.0, -1.0]), 5.0)
    assert row.status == "unknown" and "Infeasible" in row.message, row


def test_huge_big_m_coefficients_are_reported_and_never_verify():
    net = _net([6, 6, 6, 6], 2, 2, 4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(300.0)
                m.bias.mul_(300.0)
    dense = dense_from_model(net, (2, 1, 1))
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 1.0, dtype=torch.float64)
    lbs, ubs = crown_bounds(dense, lo, hi)
    C = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    res = milp_verify(dense, lo[0], hi[0], C, [l[0] for l in lbs], [u[0] for u in ubs], 5.0, lambda _: None)
    assert res.status == "unknown" and "big-M" in res.message


# --- case 5: unbounded boxes and NaN bounds -------------------------------------------------------

def test_non_finite_threat_models_are_refused():
    for kwargs in ({"eps": math.inf}, {"eps": 0.1, "data_min": -math.inf}, {"eps": 0.1, "data_max": math.inf}):
        with pytest.raises(ValueError, match="finite"):
            ThreatModel(**kwargs)
    with pytest.raises(ValueError, match="finite"):
        ThreatModel(0.1).box(torch.zeros(1), eps=math.inf)


def test_nan_bounds_never_prune_or_prove():
    net = _net([4], 2, 2, 5)
    dense = dense_from_model(net, (2, 1, 1))
    lo, hi = torch.full((2,), -math.inf, dtype=torch.float64), torch.full((2,), math.inf, dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    lbs, ubs = crown_bounds(dense, lo.view(1, -1), hi.view(1, -1))
    assert any(torch.isnan(t).any() for t in lbs + ubs)
    assert bab_verify(dense, lo, hi, C, 3.0, lambda _: None, batch=4, alpha_steps=0,
                      root_bounds=([l[0] for l in lbs], [u[0] for u in ubs])).status != "verified"
    assert milp_verify(dense, lo, hi, C, [l[0] for l in lbs], [u[0] for u in ubs], 3.0,
                       lambda _: None).status != "verified"


def test_huge_eps_is_not_verified():
    """The issue's point at eps 1e30 (now with a finite data range): never verified."""
    net = _net([4], 2, 2, 6)
    threat = ThreatModel(1e30, data_min=-1e30, data_max=1e30)
    x = torch.zeros(1, 2, 1, 1)
    y = int(net(x).argmax(1))
    for complete in ("bab", "milp"):
        rec = certify_point(net, x, y, threat, CertifyConfig(timeout=3, complete=complete, attack_steps=0),
                            dense=dense_from_model(net, (2, 1, 1)))
        assert rec["status"] != "verified", rec


# --- case 6: stale verdicts on resume -------------------------------------------------------------

def test_resume_refuses_other_models_data_settings_and_verifier_versions(tmp_path, monkeypatch):
    net = random_net("mlp", 0).eval()
    X, Y = self_labelled_points(net, 6)
    out = tmp_path / "r.jsonl"
    threat = ThreatModel(0.05)
    certify_dataset(net, X, Y, threat, out, limit=3, **QUIET)
    assert all(r["model_hash"] and r["data_hash"] and r["settings"]["timeout"] == 10.0 for r in read_records(out))
    other = random_net("mlp", 0).eval()
    with torch.no_grad():
        other.head.bias.add_(1e-3)  # a "retrained" checkpoint
    with pytest.raises(ValueError, match="another model"):
        certify_dataset(other, X, Y, threat, out, limit=6, **QUIET)
    with pytest.raises(ValueError, match="timeout"):
        certify_dataset(net, X, Y, threat, out, limit=6, **dict(QUIET, timeout=5.0))
    with pytest.raises(ValueError, match="complete"):
        certify_dataset(net, X, Y, threat, out, limit=6, complete="milp", **QUIET)
    with pytest.raises(ValueError, match="other data"):
        certify_dataset(net, X.flip(0), Y.flip(0), threat, out, limit=6, **QUIET)
    import certdist.verification.records as records_mod
    with monkeypatch.context() as m:  # a bound or policy change since the file was written
        m.setattr(records_mod, "VERIFIER_VERSION", records_mod.VERIFIER_VERSION + "-next")
        with pytest.raises(ValueError, match="verifier version"):
            certify_dataset(net, X, Y, threat, out, limit=6, **QUIET)
    old = tmp_path / "old.jsonl"  # records without the version (an older certdist)
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "verifier"}) + "\n"
                           for r in read_records(out)))
    with pytest.raises(ValueError, match="no verifier fingerprint"):
        certify_dataset(net, X, Y, threat, old, limit=6, **QUIET)
    assert certify_dataset(net, X, Y, threat, out, limit=0, **QUIET)["n"] == 0  # limit 0 reports no points
    assert certify_dataset(net, X, Y, threat, out, limit=5, **QUIET)["n"] == 5  # same run: resumes
    assert len(read_records(out)) == 5


# --- certify_point enforces eval mode -------------------------------------------------------------

def test_certify_point_verifies_the_eval_mode_network():
    net = random_net("conv_bn", 1, bn_train=True)
    X, Y = self_labelled_points(eval_copy(net), 2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = CertifyConfig(timeout=5, attack_steps=5, restarts=1, alpha_iterations=2)
    recs = [certify_point(net, X[i:i + 1], int(Y[i]), ThreatModel(0.02), cfg, i) for i in range(2)]
    assert net.training and all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    ref = [certify_point(eval_copy(net), X[i:i + 1], int(Y[i]), ThreatModel(0.02), cfg, i) for i in range(2)]
    assert [(r["status"], r["stage"]) for r in recs] == [(r["status"], r["stage"]) for r in ref]


# --- float32 underflow and overflow (review) --------------------------------------------------------

def _certify_one(net: nn.Module, x: torch.Tensor, y: int, eps: float, tmp_path, **kw) -> dict:
    out = tmp_path / "out.jsonl"
    if out.exists():
        out.unlink()
    certify_dataset(net, x, torch.tensor([y]), ThreatModel(eps), out, **{**QUIET, "timeout": 3.0, **kw})
    (rec,) = read_records(out)
    return rec


@pytest.mark.parametrize("batched", [True, False])
def test_subnormal_products_are_covered(tmp_path, batched):
    """Logits in the subnormal range: float32 products lose all relative precision (2.4 * 2^-149 and
    1.6 * 2^-149 both round to 2 * 2^-149, a tie) although the exact margin is positive on the box."""
    t = 2.0 ** -149
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[2 * t], [3 * t]]))
    x, threat = torch.ones(1, 1, 1, 1), ThreatModel(0.5)
    assert validate_counterexample(net, torch.full((1, 1, 1, 1), 0.8), x, 1, threat)
    rec = _certify_one(net, x, 1, 0.5, tmp_path, batched_ibp=batched)
    assert rec["status"] != "verified", rec


@pytest.mark.parametrize("batched", [True, False])
def test_float32_overflow_is_not_verified(tmp_path, batched):
    """Logits beyond float32's range: both become inf in float32 (a tie, argmax picks class 0) while the
    exact margin is ~1e38 > 0."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        net[1].weight.fill_(3e38)
        net[3].weight.copy_(torch.tensor([[1.5], [2.0]]))
    x, threat = torch.full((1, 1, 1, 1), 0.75), ThreatModel(0.25)
    assert validate_counterexample(net, torch.ones(1, 1, 1, 1), x, 1, threat)
    rec = _certify_one(net, x, 1, 0.25, tmp_path, batched_ibp=batched, attack_steps=20)
    assert rec["status"] != "verified", rec


def test_a_bfloat16_model_is_refused(tmp_path):
    """The tolerance is float32's: a bfloat16 network ties where its float32 twin does not (this one was
    'verified' with the corner (0.5, 0) giving bfloat16 logits (64.5, 64.5))."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0], [1.0 + 2.0 ** -6, 1.0]]))
        net[1].bias.fill_(64.0)
    net = net.to(torch.bfloat16)
    x, threat = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1).to(torch.bfloat16), ThreatModel(0.5)
    assert validate_counterexample(net, torch.tensor([0.5, 0.0]).view(1, 2, 1, 1).to(torch.bfloat16), x, 1, threat)
    with pytest.raises(ValueError, match="float32"):
        certify_dataset(net, x, torch.tensor([1]), threat, tmp_path / "o.jsonl", **QUIET)
    with pytest.raises(ValueError, match="float32"):
        certify_point(net, x.float(), 1, threat, CertifyConfig(attack_steps=0))
