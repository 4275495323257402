"""The public API on a plain nn.Sequential, the explicit CROWN method, eps notation, AutoAttack, tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import certdist
from certdist.models import CertifiableNet, as_certifiable
from certdist.threats import ThreatModel, format_eps, parse_eps

from conftest import random_net, self_labelled_points


def sequential_twin(net: CertifiableNet, nested: bool = False) -> nn.Sequential:
    """The same layers (shared parameters) as a plain nn.Sequential, optionally with a nested block."""
    layers = list(net.features)
    if nested:
        return nn.Sequential(nn.Sequential(*layers[:3]), *layers[3:], net.head)
    return nn.Sequential(*layers, net.head)


@pytest.mark.parametrize("nested", [False, True])
def test_every_entry_point_accepts_a_plain_sequential(tmp_path, nested):
    net = random_net("mlp", 3).eval()
    seq = sequential_twin(net, nested=nested)
    x, y = self_labelled_points(net, 12)
    threat = ThreatModel(0.02)
    # crown / alpha_crown walk the Sequential's own top-level layers (nested blocks: not yet)
    fns = (certdist.ibp,) if nested else (certdist.ibp, certdist.crown, certdist.crown_ibp)
    with torch.no_grad():
        for fn in fns:
            torch.testing.assert_close(fn(net, x, threat).lower, fn(seq, x, threat).lower)
    if not nested:
        al = certdist.alpha_crown(seq, x, threat, y=y, iterations=3)
        assert al.lower.shape == (12, 3)
    ev_net = certdist.evaluation.evaluate(net, x, y, threat, pgd_steps=3, progress=False)
    ev_seq = certdist.evaluation.evaluate(seq, x, y, threat, pgd_steps=3, progress=False)
    assert ev_net["clean_acc"] == ev_seq["clean_acc"] == 100.0 and ev_net["ibp_cert_acc"] == ev_seq["ibp_cert_acc"]
    summary = certdist.certify_dataset(seq, x[:4], y[:4], threat, tmp_path / "c.jsonl", timeout=5, progress=False)
    assert summary["n"] == 4
    path = certdist.export_onnx(seq, tmp_path / "seq.onnx", (1, 3, 3))  # checked against torch inside
    assert path.stat().st_size > 0


def test_as_certifiable_shares_parameters_and_refuses_other_chains():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    view = as_certifiable(seq)
    assert view.head is seq[3] and view.feature_dim == 3 and view.num_classes == 2 and view.input_spec is None
    view.eval()
    assert not seq[1].training  # the view acts on the user's modules
    seq.eval()
    assert not as_certifiable(seq).training  # and reports the model's mode (restored after evaluation)
    x = torch.rand(5, 4)
    certdist.evaluation.evaluate(seq, x, seq(x).argmax(1), ThreatModel(0.1), pgd_steps=2, progress=False)
    assert not any(m.training for m in seq.modules())
    with pytest.raises(TypeError, match="last layer of the network must be an nn.Linear"):
        as_certifiable(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="expected a CertifiableNet or an nn.Sequential"):
        as_certifiable(nn.Linear(3, 2))


def test_crown_means_full_crown_and_crown_ibp_is_explicit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))  # 2 hidden layers
    x = torch.rand(16, 6)
    threat = ThreatModel(0.1)
    with torch.no_grad():
        default = certdist.crown(net, x, threat)
        full = certdist.crown(net, x, threat, intermediate="crown")
        cibp = certdist.crown_ibp(net, x, threat)
    torch.testing.assert_close(default.lower, full.lower)
    torch.testing.assert_close(default.upper, full.upper)
    width_full = (full.upper - full.lower).mean()
    width_cibp = (cibp.upper - cibp.lower).mean()
    assert width_full < 0.9 * width_cibp  # CROWN-IBP is looser: the default must not silently be it


def test_eps_in_the_fields_notation_and_beyond_the_data_range():
    assert parse_eps("8/255") == pytest.approx(8 / 255) and parse_eps(" 0.1 ") == 0.1 and parse_eps(2) == 2.0
    assert ThreatModel("8/255").eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="exceeds the data range"):
        ThreatModel(8)
    with pytest.raises(ValueError, match="fraction like 8/255"):
        parse_eps("8//255")
    from certdist.config import ConfigError, load_config
    assert load_config(None, ["eps=8/255"]).eps == pytest.approx(8 / 255)
    with pytest.raises(ConfigError, match="eps: eps 8 exceeds the data range"):
        load_config(None, ["eps=8"])
    with pytest.raises(ConfigError, match=r"eps \* train_eps_mul"):
        load_config(None, ["eps=0.5", "train_eps_mul=3"])
    assert format_eps(8 / 255) == "8/255" and format_eps(0.1) == "0.1" and format_eps(0) == "0"


def test_cc_dist_method_says_how_to_get_it():
    from certdist.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"method=cc-ibp distill.teacher="):
        load_config(None, ["method=cc-dist"])


def test_autoattack_is_the_standard_version_and_named_in_the_results():
    from certdist.attacks.autoattack import autoattack, standard_attacks
    net = random_net("mlp", 6).eval()  # 4 classes
    apgd_ce, apgd_t, fab_t, square = standard_attacks(net, 8 / 255, num_classes=10)
    assert (apgd_ce.steps, apgd_ce.loss, apgd_ce.n_restarts) == (100, "ce", 1)
    assert (apgd_t.steps, apgd_t.n_target_classes) == (100, 9)
    assert (fab_t.steps, fab_t.multi_targeted, fab_t.n_target_classes) == (100, True, 9)
    assert square.n_queries == 5000
    _, apgd_t, fab_t, _ = standard_attacks(net, 8 / 255, num_classes=200)  # TinyImageNet: still 9 targets
    assert apgd_t.n_target_classes == fab_t.n_target_classes == 9
    x, y = self_labelled_points(net, 24)
    threat = ThreatModel(0.3)  # large: APGD-CE breaks every point, the later attacks have nothing left
    r = certdist.evaluation.evaluate(net, x, y, threat, progress=False, attack_name="autoattack")
    assert r["attack"] == "autoattack" and "pgd_acc" not in r
    assert r["attack_desc"].startswith("AutoAttack standard (APGD-CE 100 it., APGD-T") and "Square 5000" in r["attack_desc"]
    assert r["robust_acc"] < r["clean_acc"] == 100.0
    xa = autoattack(net, x, y, threat, num_classes=4)
    assert bool(threat.contains(xa, x, tol=0).all()) and xa.min() >= 0 and xa.max() <= 1
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack(nn.Sequential(nn.Flatten(), nn.Linear(9, 2)), x, y % 2, threat, num_classes=2)


def test_table_and_plot_name_the_attack_and_show_the_trade_off(tmp_path):
    from certdist.reporting import format_table, plot_figure
    rows = []
    for seed, (attack, acc) in enumerate([("apgd", 50.0), ("autoattack", 40.0)]):
        d = tmp_path / "runs" / "r" / f"seed{seed}"
        d.mkdir(parents=True)
        res = {"dataset": "synthetic", "arch": "mlp", "method": "ibp", "eps": 8 / 255, "n": 10, "clean_acc": 60.0,
               "robust_acc": acc, "ibp_cert_acc": 30.0 + seed, "attack": attack,
               "attack_settings": {"steps": 40} if attack == "apgd" else {"version": "standard"},
               "config": {"name": "r", "seed": seed}}
        (d / "results.json").write_text(json.dumps(res))
        (d / "metrics.csv").write_text("epoch,lr,eps,time_s,train_loss,test_clean,test_ibp_cert\n"
                                       "1,0.001,0.0,1,2.0,40,10\n2,0.001,0.01,1,1.5,50,20\n3,0.001,0.03,1,1.2,60,30\n")
        rows.append(res)
    table = format_table(rows, group=False)
    assert "PGD %" not in table and "| PGD" not in table and "| APGD-40 | 50.00 |" in table and "| AutoAttack | 40.00 |" in table
    assert "| 8/255 |" in table
    fig = plot_figure([tmp_path / "runs"])  # a parent folder, like `table`
    axes = fig.axes
    assert len(axes) == 4 and "trade-off" in axes[3].get_title()
    assert len(axes[3].collections) == 2  # one point per run
    for ax in axes[:3]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_the_package_ships_its_yaml_configs():
    import tomllib
    from certdist.config import load_config, packaged_configs_dir, resolve_config_path
    root = Path(__file__).resolve().parents[2]
    packaged = sorted(p.relative_to(packaged_configs_dir()) for p in packaged_configs_dir().rglob("*.yaml"))
    in_repo = sorted(p.relative_to(root / "configs") for p in (root / "configs").rglob("*.yaml"))
    assert packaged and packaged == in_repo
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["certdist"]
    pkg = root / "src" / "certdist"
    assert any(list(pkg.glob(g)) and g.endswith(".yaml") for g in globs)
    # a packaged config is found by name from any folder (non-editable installs)
    assert resolve_config_path("small/mnist_cc-ibp.yaml").is_file()
    assert load_config("configs/small/mnist_cc-ibp.yaml").method == "cc-ibp"


def test_a_float64_model_gets_a_clear_error_not_a_dtype_traceback(tmp_path):
    net = sequential_twin(random_net("mlp", 3).eval()).double()
    x, y = self_labelled_points(random_net("mlp", 3).eval(), 4)
    for fn in (certdist.evaluate, certdist.certify):
        with pytest.raises(ValueError, match=r"float32 model.*model\.float\(\)"):
            fn(net, (x, y), 0.01)
    with pytest.raises(ValueError, match="images must be float32"):
        certdist.certify_dataset(net.float(), x.double(), y, ThreatModel(0.01), tmp_path / "o.jsonl", progress=False)


def test_fit_refuses_a_float64_model_or_a_non_linear_head_before_making_a_run_folder(tmp_path):
    loader = [(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))]
    head_relu = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    as_double = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    for model, err in ((head_relu, TypeError), (as_double, ValueError)):
        with pytest.raises(err, match="nn.Linear|float32"):
            certdist.fit(model, loader, epochs=1, out_dir=str(tmp_path), name="run", progress=False)
    assert not (tmp_path / "run").exists()


def test_certify_resumes_its_file_with_a_larger_limit(tmp_path):
    """The records carry the data hash: it must be that of the loader, not of its first `limit` points."""
    net = random_net("mlp", 3).eval()
    x, y = self_labelled_points(net, 5)
    out = tmp_path / "c.jsonl"
    quick = dict(out=out, attack_steps=2, restarts=1, complete="none")
    assert certdist.certify(net, (x, y), 0.01, limit=2, **quick)["n"] == 2
    assert certdist.certify(net, (x, y), 0.01, limit=4, **quick)["n"] == 4
    assert len(certdist.verification.read_records(out)) == 4


def _blobs(n: int = 128):
    """4 classes of 1x6x6 images around fixed prototypes, in [0, 1], and a small network for them."""
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    data = TensorDataset((protos[y] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1), y)
    net = nn.Sequential(certdist.Normalize([0.5], [0.3]), nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4))
    return data, net


def test_fit_with_only_epochs_scales_the_method_schedule_and_reaches_eps(tmp_path):
    """fit(method="cc-ibp", eps=0.1, epochs=2) used to keep the 10-epoch ramp and stop at eps 0.003."""
    from torch.utils.data import DataLoader
    data, net = _blobs()
    r = certdist.fit(net, DataLoader(data, batch_size=32), method="cc-ibp", eps=0.1, epochs=2, out_dir=tmp_path,
                     progress=False)
    c = r.results["config"]
    assert (c["epochs"], c["warmup_epochs"], c["ramp_epochs"], c["lr_milestones"]) == (2, 0, 1, [])
    assert r.train_eps_reached == pytest.approx(0.1) and r.results["train_eps"] == pytest.approx(0.1)
    assert r.results["train_eps_reached"] == pytest.approx(0.1) and float(r.metrics[-1]["eps"]) == pytest.approx(0.1)
    assert all(row["train_clean_acc"] not in ("", None) for row in r.metrics)  # counted during the ramp too
    with pytest.raises(certdist.config.ConfigError, match=r"warmup_epochs \+ ramp_epochs.*epochs=2"):
        certdist.fit(net, DataLoader(data, batch_size=32), method="cc-ibp", epochs=2, ramp_epochs=5, out_dir=tmp_path,
                     name="long", progress=False)
    assert not (tmp_path / "long").exists()


def test_fit_pgd_at_is_the_10_step_recipe_unless_told_otherwise(tmp_path):
    from torch.utils.data import DataLoader
    data, net = _blobs(64)
    loader = DataLoader(data, batch_size=32)
    c = certdist.fit(net, loader, method="pgd-at", eps=0.1, epochs=1, out_dir=tmp_path, name="a",
                     progress=False).results["config"]
    assert (c["attack"]["steps"], c["attack"]["step_size"], c["warmup_epochs"], c["ramp_epochs"]) == (10, 0.25, 0, 0)
    c = certdist.fit(net, loader, method="pgd-at", eps=0.1, epochs=1, out_dir=tmp_path, name="b", progress=False,
                     attack={"steps": 2}).results["config"]
    assert (c["attack"]["steps"], c["attack"]["step_size"]) == (2, 0.25)


def test_fit_records_the_loaders_batch_size_and_refuses_a_different_one(tmp_path):
    from torch.utils.data import DataLoader
    data, net = _blobs(64)
    with pytest.raises(ValueError, match=r"batch_size=32 but train_loader yields batches of 16"):
        certdist.fit(net, DataLoader(data, batch_size=16), method="standard", epochs=1, batch_size=32,
                     out_dir=tmp_path, progress=False)
    assert not (tmp_path / "run").exists()
    r = certdist.fit(net, DataLoader(data, batch_size=16), method="standard", epochs=1, out_dir=tmp_path,
                     name="dl", progress=False)
    assert r.results["config"]["batch_size"] == 16
    batches = [(data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]) for i in range(0, 64, 8)]
    r = certdist.fit(net, batches, method="standard", epochs=1, out_dir=tmp_path, name="list", progress=False)
    assert r.results["config"]["batch_size"] == 8  # a list of batches: the first batch's size


def test_fit_errors_name_the_argument_as_well_as_the_cli_flag(tmp_path):
    from certdist.training.loop import TrainingError
    data, net = _blobs(32)
    batches = [(data.tensors[0], data.tensors[1])]
    opts = dict(method="standard", epochs=1, out_dir=tmp_path, progress=False)
    certdist.fit(net, batches, name="r", **opts)
    with pytest.raises(TrainingError, match=r"resume=True \(CLI: --resume\).*overwrite=True \(CLI: --overwrite\)"):
        certdist.fit(net, batches, name="r", **opts)
    with pytest.raises(TrainingError, match=r"resume=True \(CLI: --resume\): no checkpoint"):
        certdist.fit(net, batches, name="other", resume=True, **opts)
