"""The certify schedule and its effort budget: verdicts counted in work, not seconds, so that a checkpoint
gets the same verdicts on a slow or loaded machine; the wall clock is only a cap, and capped points are
recorded and counted."""
import time

import pytest
import torch

import certdist.verification.certify as cert
from certdist.threats import ThreatModel
from certdist.verification.bab import bab_verify
from certdist.verification.certify import CertifyConfig, certify_dataset, format_summary, read_records
from certdist.verification.chain_bab import chain_bab_verify
from certdist.verification.dense import dense_from_model
from conftest import random_net, self_labelled_points

TIMING = ("time_s", "stage_time_s")


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING}


@pytest.fixture(scope="module")
def conv_points():
    net = random_net("conv", 3).eval()
    x, y = self_labelled_points(net, 16, seed=1)
    return net, x, y


def _slow_clock(factor: float):
    """``time.monotonic`` of a machine ``factor`` times slower (or as loaded): every interval is longer."""
    real, t0 = time.monotonic, time.monotonic()
    return lambda: t0 + factor * (real() - t0)


def test_verdicts_and_effort_do_not_depend_on_the_machine_speed(conv_points, tmp_path, monkeypatch):
    """The same points on an 'idle' and on a 5x slower clock: identical records (verdict, stage, margins,
    work per stage), as long as no point reaches the wall-clock cap. A budget in seconds (branch and bound
    until the timeout, as before the effort budget) would spend different work on the two clocks."""
    net, x, y = conv_points
    threat = ThreatModel(0.03)
    opts = dict(progress=False, timeout=30.0, attack_steps=15, restarts=2, alpha_iterations=5,
                chain_bab_alpha_steps=3, max_domains=60, complete="chain-bab")
    idle = certify_dataset(net, x, y, threat, tmp_path / "idle.jsonl", **opts)
    monkeypatch.setattr(time, "monotonic", _slow_clock(5.0))
    slow = certify_dataset(net, x, y, threat, tmp_path / "slow.jsonl", **opts)
    a, b = read_records(tmp_path / "idle.jsonl"), read_records(tmp_path / "slow.jsonl")
    assert [_strip(r) for r in a] == [_strip(r) for r in b]
    assert idle["counts"] == slow["counts"] and idle["effort"] == slow["effort"]
    assert idle["capped"] == slow["capped"] == 0
    # the schedule ran every kind of stage on these points, so the comparison covers them
    stages = {s for r in a for s in r.get("effort", {})}
    assert {"attack-quick", "ibp", "crown", "attack", "apgd", "alpha-crown", "chain-bab"} <= stages, stages
    assert {"verified", "falsified", "unknown"} <= {r["status"] for r in a}
    assert any(r.get("message", "").endswith("domain budget") for r in a)


def test_the_wall_clock_cap_is_recorded_and_counted(conv_points, tmp_path, monkeypatch):
    """A clock so slow that every point reaches the cap: those points say so (``capped``, the stage), the
    summary counts them and its text warns that their verdicts depend on the machine."""
    net, x, y = conv_points
    monkeypatch.setattr(time, "monotonic", _slow_clock(1e6))
    s = certify_dataset(net, x, y, ThreatModel(0.08), tmp_path / "r.jsonl", progress=False, timeout=1.0,
                        batched_ibp=False)
    recs = read_records(tmp_path / "r.jsonl")
    capped = [r for r in recs if r.get("capped")]
    assert capped and s["capped"] == len(capped)
    assert all(r["status"] in ("unknown", "falsified", "misclassified", "verified") for r in recs)
    assert all(r["status"] != "verified" or r["stage"] == "ibp" for r in capped)  # nothing proved past the cap
    assert "wall-clock cap reached on" in format_summary(s)


def test_the_quick_attack_runs_before_any_bound(conv_points, tmp_path):
    """Points the quick attack falsifies cost no bound pass; the full attack runs only on points that IBP
    and CROWN leave open; and the summary reports work and unknowns per stage."""
    net, x, y = conv_points
    s = certify_dataset(net, x, y, ThreatModel(0.15), tmp_path / "r.jsonl", progress=False, attack_steps=20,
                        restarts=2, alpha_iterations=3, complete="none")
    recs = read_records(tmp_path / "r.jsonl")
    quick = [r for r in recs if r["stage"] == "attack-quick"]
    assert quick and all(r["status"] == "falsified" and set(r["effort"]) == {"attack-quick"} for r in quick)
    for r in recs:
        if "attack" in r.get("effort", {}):  # the full attack only after IBP and CROWN failed to prove
            assert {"ibp", "crown"} <= set(r["effort"]) and r["margins"]["crown"] is not None
    assert s["effort"]["attack-quick"]["attack_steps"] > 0
    text = format_summary(s)
    assert "attack-quick" in text and "unknown" in text


@pytest.mark.parametrize("form", ["chain", "dense"])
def test_branch_and_bound_stops_at_its_domain_budget(form):
    """A search that can neither prove (threshold out of reach) nor falsify (the checker rejects every
    candidate) ends unknown after at most ``max_domains`` domains, whatever the time limit."""
    net = random_net("mlp", 0).eval().double()
    x = torch.full((1, 1, 3, 3), 0.5, dtype=torch.float64)
    threat = ThreatModel(0.3)
    C = torch.zeros(1, 4, dtype=torch.float64)
    C[0, 0], C[0, 1] = 1.0, -1.0
    results = []
    for budget in (7, 30):
        if form == "chain":
            res = chain_bab_verify(net, x, threat, C, 600.0, lambda p: None, threshold=1e9, batch=4,
                                   alpha_steps=1, max_domains=budget)
        else:
            dense = dense_from_model(net.float(), (1, 3, 3), 10**7)
            net.double()
            box = threat.box(x)
            res = bab_verify(dense, box.lower.flatten(), box.upper.flatten(), C, 600.0, lambda p: None, batch=4,
                             alpha_steps=1, tol=1e9, max_domains=budget)
        assert res.status == "unknown" and res.message == "domain budget" and res.domains <= budget
        results.append(res.domains)
    assert results[1] > results[0]


def test_an_explicit_config_is_not_overridden_by_the_defaults(conv_points, tmp_path):
    net, x, y = conv_points
    cfg = CertifyConfig(timeout=30.0, attack_steps=7, restarts=3, complete="none")
    certify_dataset(net, x, y, ThreatModel(0.05), tmp_path / "r.jsonl", limit=2, config=cfg, progress=False)
    settings = read_records(tmp_path / "r.jsonl")[0]["settings"]
    assert (settings["timeout"], settings["attack_steps"], settings["restarts"], settings["complete"]) == \
        (30.0, 7, 3, "none")
    certify_dataset(net, x, y, ThreatModel(0.05), tmp_path / "s.jsonl", limit=2, config=cfg, timeout=5.0,
                    progress=False)
    assert read_records(tmp_path / "s.jsonl")[0]["settings"]["timeout"] == 5.0  # an explicit argument wins


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="attack_share"):
        CertifyConfig(attack_share=0.0)
    with pytest.raises(ValueError, match="max_domains"):
        CertifyConfig(max_domains=0)
    with pytest.raises(ValueError, match="quick_attack_steps"):
        CertifyConfig(quick_attack_steps=-1)
    assert cert.VERIFIER_VERSION >= "2026.12.1"
