"""The certification pipeline end to end on tiny networks: stages, counterexamples, eval mode,
resume, shards and merge."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certdist.attacks.pgd import pgd
from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.threats import ThreatModel
from certdist.verification import (certify_dataset, format_summary, merge, read_records, summarize,
                                   validate_counterexample)
from conftest import random_net, self_labelled_points

FAST = dict(timeout=10.0, attack_steps=10, restarts=2, progress=False, alpha_iterations=5, bab_alpha_steps=5)


def trained_net(seed: int = 0, bn: bool = False) -> tuple[CertifiableNet, torch.Tensor, torch.Tensor]:
    """A 2-D-input MLP (16, 12 ReLUs; optional BatchNorm) trained briefly on 3 synthetic regions;
    returns the net (eval mode) and 24 test points with their labels."""
    torch.manual_seed(seed)
    spec = InputSpec(2, 1, 3, (0.5, 0.5), (0.3, 0.3))
    feats: list[nn.Module] = [Normalize(spec.mean, spec.std), nn.Flatten(), nn.Linear(2, 16)]
    feats += [nn.BatchNorm1d(16)] if bn else []
    feats += [nn.ReLU(), nn.Linear(16, 12), nn.ReLU()]
    net = CertifiableNet(nn.Sequential(*feats), nn.Linear(12, 3), "tiny", spec)
    label = lambda X: ((X[:, 0, 0, 0] > 0.5).long() + (X[:, 1, 0, 0] > X[:, 0, 0, 0]).long())  # noqa: E731
    X = torch.rand(512, 2, 1, 1)
    opt = torch.optim.Adam(net.parameters(), 0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), label(X)).backward()
        opt.step()
    Xt = torch.rand(24, 2, 1, 1, generator=torch.Generator().manual_seed(100 + seed))
    return net.eval(), Xt, label(Xt)


def _grid_counterexample(net, x, y, eps, n=61) -> bool:
    box = ThreatModel(eps).box(x)
    t = torch.linspace(0, 1, n)
    a, b = torch.meshgrid(t, t, indexing="ij")
    pts = box.lower.flatten() + torch.stack([a.flatten(), b.flatten()], 1) * (box.upper - box.lower).flatten()
    with torch.no_grad():
        return bool((net(pts.view(-1, 2, 1, 1)).argmax(1) != y).any())


@pytest.fixture(scope="module")
def net_data():
    return trained_net(0)


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_pipeline_verdicts_are_sound(net_data, tmp_path, eps):
    net, X, Y = net_data
    threat = ThreatModel(eps)
    summary = certify_dataset(net, X, Y, threat, tmp_path / "r.jsonl", **FAST)
    recs = read_records(tmp_path / "r.jsonl")
    assert len(recs) == len(X) == summary["n"]
    for r in recs:
        i = r["index"]
        x, y = X[i:i + 1], int(Y[i])
        assert r["status"] in ("misclassified", "falsified", "verified")  # tiny nets: always decided
        if r["status"] == "falsified":
            cex = torch.tensor(r["counterexample"]).view_as(x)
            assert validate_counterexample(net, cex, x, y, threat)
            assert r["stage"] in ("attack-quick", "attack", "apgd", "bab", "milp")
        if r["status"] == "verified":
            assert r["stage"] in ("ibp", "crown", "alpha-crown", "bab", "milp")
            assert not _grid_counterexample(net, x, y, eps)
            adv = pgd(net, x, torch.tensor([y]), threat, steps=20, restarts=10)
            assert not validate_counterexample(net, adv, x, y, threat)
            assert r["margins"][r["stage"]] > 0
    assert summary["counts"]["verified"] > 0 and summary["counts"]["falsified"] > 0
    assert summary["ibp_certified_accuracy"] <= summary["certified_accuracy"] <= summary["attack_accuracy"]
    assert "certified (pipeline)" in format_summary(summary)


def test_bab_and_milp_pipelines_agree(net_data, tmp_path):
    """With a weak attack the complete verifiers decide the hard points; both give the same verdicts."""
    net, X, Y = net_data
    threat = ThreatModel(0.08)
    opts = dict(FAST, attack_steps=0, restarts=1, alpha_iterations=0)
    certify_dataset(net, X, Y, threat, tmp_path / "bab.jsonl", complete="bab", **opts)
    certify_dataset(net, X, Y, threat, tmp_path / "milp.jsonl", complete="milp", **opts)
    bab = {r["index"]: r for r in read_records(tmp_path / "bab.jsonl")}
    milp = {r["index"]: r for r in read_records(tmp_path / "milp.jsonl")}
    assert {i: r["status"] for i, r in bab.items()} == {i: r["status"] for i, r in milp.items()}
    assert any(r["stage"] == "bab" for r in bab.values())
    assert any(r["stage"] == "milp" for r in milp.values())


def test_nets_without_a_dense_form_go_to_chain_bab(net_data, tmp_path):
    """With no dense form (a tiny weight budget) the hard points go to branch and bound on the layer
    chain, which reaches the dense BaB's verdicts."""
    net, X, Y = net_data
    threat = ThreatModel(0.08)
    opts = dict(FAST, attack_steps=0, restarts=1, alpha_iterations=0)
    certify_dataset(net, X, Y, threat, tmp_path / "bab.jsonl", complete="bab", **opts)
    certify_dataset(net, X, Y, threat, tmp_path / "chain.jsonl", complete="auto", max_dense_weights=1, **opts)
    bab = {r["index"]: r for r in read_records(tmp_path / "bab.jsonl")}
    chain = {r["index"]: r for r in read_records(tmp_path / "chain.jsonl")}
    assert {i: r["status"] for i, r in chain.items()} == {i: r["status"] for i, r in bab.items()}
    hard = [r for r in chain.values() if r["stage"] == "chain-bab"]
    assert hard and all(r["status"] in ("verified", "falsified") for r in hard)
    for r in hard:
        i = r["index"]
        if r["status"] == "verified":
            assert r["margins"]["chain-bab"] > 0 and not _grid_counterexample(net, X[i:i + 1], int(Y[i]), 0.08)
        else:
            cex = torch.tensor(r["counterexample"]).view_as(X[i:i + 1])
            assert validate_counterexample(net, cex, X[i:i + 1], int(Y[i]), threat)


def _certify_runs(net, X, Y, eps, tmp_path, **runs) -> dict[str, dict[int, dict]]:
    """Records by index of one certify run per named set of options (weak attack, no alpha-CROWN, so
    that the complete verifiers decide the hard points)."""
    opts = dict(FAST, attack_steps=0, restarts=1, alpha_iterations=0)
    out = {}
    for name, kw in runs.items():
        certify_dataset(net, X, Y, ThreatModel(eps), tmp_path / f"{name}.jsonl", **{**opts, **kw})
        out[name] = {r["index"]: r for r in read_records(tmp_path / f"{name}.jsonl")}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_auto_verdicts_equal_the_milp(net_data, tmp_path, kind):
    """``complete="auto"`` (the MILP on these small nets) and auto forced to chain BaB
    (``milp_max_unstable=0``) give the exact MILP's verdicts, on an MLP and on a conv net."""
    if kind == "mlp":
        (net, X, Y), eps = net_data, 0.08
    else:
        net, eps = random_net("conv", 1), 0.02
        X, Y = self_labelled_points(net, 12, seed=5)
    runs = _certify_runs(net, X, Y, eps, tmp_path, milp=dict(complete="milp"), auto=dict(complete="auto"),
                         chain=dict(complete="auto", milp_max_unstable=0))
    status = {name: {i: r["status"] for i, r in recs.items()} for name, recs in runs.items()}
    assert status["auto"] == status["milp"] == status["chain"]
    hard = {name: [r for r in recs.values() if r["stage"] in ("milp", "chain-bab")] for name, recs in runs.items()}
    assert hard["milp"] and {"verified", "falsified"} <= set(status["milp"].values())
    if kind == "conv":  # the complete verifiers prove some points and falsify others
        assert {r["status"] for r in hard["milp"]} == {"verified", "falsified"}
    assert all(r["stage"] == "milp" and r["unstable"] <= 64 for r in hard["auto"])
    assert all(r["stage"] == ("chain-bab" if r["unstable"] > 0 else "milp") for r in hard["chain"])
    assert any(r["stage"] == "chain-bab" for r in hard["chain"])


def test_auto_picks_chain_bab_above_milp_max_unstable(net_data, tmp_path, monkeypatch):
    """Under ``auto`` a hard point goes to the MILP iff it has at most ``milp_max_unstable`` unstable ReLUs
    after CROWN, else to chain BaB, which starts from the CROWN stage's intermediate bounds."""
    import certdist.verification.stages as stages_mod
    net, X, Y = net_data
    counts = [r["unstable"] for r in _certify_runs(net, X, Y, 0.08, tmp_path, probe={})["probe"].values()
              if "unstable" in r]
    limit = sorted(counts)[len(counts) // 2]
    assert min(counts) <= limit < max(counts)
    roots = []

    def spy(*args, root_bounds=None, **kwargs):
        roots.append(root_bounds)
        return chain_bab_verify(*args, root_bounds=root_bounds, **kwargs)
    chain_bab_verify = stages_mod.chain_bab_verify
    monkeypatch.setattr(stages_mod, "chain_bab_verify", spy)
    recs = _certify_runs(net, X, Y, 0.08, tmp_path, split=dict(milp_max_unstable=limit))["split"].values()
    hard = [r for r in recs if "unstable" in r]
    assert len(hard) == len(counts)
    assert all(r["stage"] == ("milp" if r["unstable"] <= limit else "chain-bab") for r in hard)
    assert all(r["status"] in ("verified", "falsified") for r in hard)
    assert len(roots) == sum(r["stage"] == "chain-bab" for r in hard) > 0
    assert all(b is not None and len(b) == 2 for b in roots)  # the MLP's two ReLU layers


def test_train_mode_model_is_verified_in_eval_mode(tmp_path):
    net, X, Y = trained_net(1, bn=True)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    threat = ThreatModel(0.05)
    certify_dataset(net, X[:8], Y[:8], threat, tmp_path / "train.jsonl", **FAST)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # BN stats untouched
    certify_dataset(net.eval(), X[:8], Y[:8], threat, tmp_path / "eval.jsonl", **FAST)
    strip = lambda rs: [(r["status"], r["stage"], r["margins"].get("ibp")) for r in rs]  # noqa: E731
    assert strip(read_records(tmp_path / "train.jsonl")) == strip(read_records(tmp_path / "eval.jsonl"))


def test_resume_skips_decided_points(net_data, tmp_path, monkeypatch):
    net, X, Y = net_data
    out = tmp_path / "r.jsonl"
    threat = ThreatModel(0.05)
    certify_dataset(net, X, Y, threat, out, limit=6, **FAST)
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"index": 6, "label": 0, "sta')  # a record cut by a killed run
    import certdist.verification.certify as cert
    calls = []
    orig = cert.certify_prepared
    monkeypatch.setattr(cert, "certify_prepared", lambda *a, **k: calls.append(a[5]) or orig(*a, **k))
    summary = certify_dataset(net, X, Y, threat, out, limit=10, **FAST)
    assert set(calls) <= {6, 7, 8, 9}  # points 0-5 are not redone (6-9: those IBP did not decide)
    assert out.read_text().startswith(first)
    assert [r["index"] for r in read_records(out)] == list(range(10)) and summary["n"] == 10
    with pytest.raises(ValueError, match="eps"):
        certify_dataset(net, X, Y, ThreatModel(0.1), out, limit=10, **FAST)


def test_shards_merge_into_the_unsharded_summary(net_data, tmp_path):
    net, X, Y = net_data
    threat = ThreatModel(0.06)
    full = certify_dataset(net, X, Y, threat, tmp_path / "all.jsonl", limit=12, **FAST)
    paths = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for i, p in enumerate(paths):
        part = certify_dataset(net, X, Y, threat, p, limit=12, shard=(i, 3), **FAST)
        assert all(r["index"] % 3 == i for r in read_records(p)) and part["n"] == 4
    merged = merge(paths)
    drop = lambda s: {k: v for k, v in s.items() if not k.startswith("time") and k != "stage_seconds"}  # noqa: E731
    assert drop(merged) == drop(full)
    with pytest.raises(ValueError, match="twice"):
        merge([paths[0], paths[0]])
    recs = read_records(paths[1])
    recs[0]["eps"] = 0.5
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="eps"):
        merge([paths[0], other])


def test_apgd_stage_falsifies_points_the_bound_stages_leave_open(net_data, tmp_path):
    """Without the first attack and complete verification, the points with a counterexample that the
    bound stages leave open are unknown; the APGD stage falsifies some of them, with valid counterexamples,
    and changes no other verdict."""
    net, X, Y = net_data
    threat = ThreatModel(0.2)
    opts = dict(FAST, attack_losses=(), quick_attack_steps=0, complete="none")
    off = {r["index"]: r for r in read_records(certify_dataset(net, X, Y, threat, tmp_path / "off.jsonl",
                                                               apgd_restarts=0, **opts) and tmp_path / "off.jsonl")}
    on = {r["index"]: r for r in read_records(certify_dataset(net, X, Y, threat, tmp_path / "on.jsonl", **opts)
                                              and tmp_path / "on.jsonl")}
    assert not any(r["status"] == "falsified" for r in off.values())
    found = [i for i, r in on.items() if r["status"] == "falsified"]
    assert found and all(on[i]["stage"] == "apgd" and off[i]["status"] == "unknown" for i in found)
    for i in found:
        cex = torch.tensor(on[i]["counterexample"]).view_as(X[i:i + 1])
        assert validate_counterexample(net, cex, X[i:i + 1], int(Y[i]), threat)
    assert all(on[i]["status"] == off[i]["status"] for i in on if i not in found)


def test_timeout_and_disabled_complete_give_unknown(tmp_path):
    net = random_net("conv", 0).eval()
    X, Y = self_labelled_points(net, 4)
    s = certify_dataset(net, X, Y, ThreatModel(0.02), tmp_path / "r.jsonl", complete="none",
                        **dict(FAST, attack_steps=2, restarts=1))
    assert s["counts"]["misclassified"] == 0
    for r in read_records(tmp_path / "r.jsonl"):
        assert r["status"] in ("verified", "falsified", "unknown")
        if r["status"] == "unknown":
            assert "disabled" in r["message"] and "alpha-crown" in r["margins"]


def test_bad_inputs_fail_loudly(net_data, tmp_path):
    net, X, Y = net_data
    with pytest.raises(ValueError, match="255"):
        certify_dataset(net, (X * 255).to(torch.uint8), Y, ThreatModel(0.1), tmp_path / "r.jsonl", progress=False)
    with pytest.raises(ValueError, match="complete method 'exact'; known: auto, chain-bab, bab, milp, none"):
        certify_dataset(net, X, Y, ThreatModel(0.1), tmp_path / "r.jsonl", complete="exact", progress=False)
    with pytest.raises(ValueError, match="shard"):
        certify_dataset(net, X, Y, ThreatModel(0.1), tmp_path / "r.jsonl", shard=(2, 2), progress=False)
    assert summarize([])["n"] == 0


def test_batched_ibp_prepass_keeps_the_verdicts(net_data, tmp_path):
    """Deciding misclassified and IBP-verified points in batches first gives the per-point verdicts."""
    net, X, Y = net_data
    for eps in (0.02, 0.06):
        threat = ThreatModel(eps)
        a = read_records(certify_dataset(net, X, Y, threat, tmp_path / f"a{eps}.jsonl", limit=12, **FAST) and
                         tmp_path / f"a{eps}.jsonl")
        b = read_records(certify_dataset(net, X, Y, threat, tmp_path / f"b{eps}.jsonl", limit=12,
                                         batched_ibp=False, **FAST) and tmp_path / f"b{eps}.jsonl")
        assert [(r["index"], r["status"], r["stage"]) for r in a] == [(r["index"], r["status"], r["stage"]) for r in b]


def test_overflowing_bounds_are_never_a_proof():
    """Weights that overflow float32 bound arithmetic give NaN bounds: they must not verify a point
    that has a counterexample (found in float64 at (0.6, 0.5))."""
    from certdist.models.cnn import mlp
    from certdist.models import InputSpec
    from certdist.verification import CertifyConfig, certify_point, dense_from_model, eval_copy
    m = mlp(InputSpec(2, 1, 2, (0.0, 0.0), (1.0, 1.0)), widths=(2, 2))
    l1, l2, head = m.features[2], m.features[4], m.head
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1e37, -1e37], [-1e37, 1e37]]))
        l1.bias.zero_()
        l2.weight.copy_(torch.tensor([[1e5, 1e5], [2e5, 2e5]]))
        l2.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        head.bias.copy_(torch.tensor([1.0, 0.0]))
    net = eval_copy(m)
    x = torch.full((1, 2, 1, 1), 0.5)
    dense = dense_from_model(net, (2, 1, 1))
    for complete in ("milp", "bab"):
        rec = certify_point(net, x, 0, ThreatModel(0.1),
                            CertifyConfig(timeout=5, complete=complete, attack_steps=10, restarts=2), 0, dense)
        assert rec["status"] != "verified", rec
