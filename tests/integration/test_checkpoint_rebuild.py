"""Checkpoints of certdist.fit (a user's own nn.Sequential) carry a declarative description of the
architecture: every verb (evaluate / certify / export --checkpoint) and fit(teacher=path) rebuild them."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certdist
from certdist import data as D
from certdist.cli import main
from certdist.models.describe import DescriptionError, build_from_description, describe
from certdist.training import checkpoint as ckpt

OPTS = dict(eps=0.1, warmup_epochs=0, ramp_epochs=1, lr=3e-3, lr_milestones=[], progress=False, batch_size=64,
            eval={"pgd_steps": 2})


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(certdist.Normalize([0.3], [0.3]), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_conv() -> nn.Sequential:  # a nested block: its state-dict keys ("1.0.weight") must be rebuilt as they are
    block = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(certdist.Normalize([0.3], [0.3]), block, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def synthetic_loader(n: int = 256) -> DataLoader:
    d = D.load("synthetic", "train", limit=n)
    return DataLoader(TensorDataset(d.images, d.labels), batch_size=64, shuffle=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    runs = {}
    for name, make in (("mlp", tiny_mlp), ("conv", tiny_conv)):
        net = make()
        res = certdist.fit(net, synthetic_loader(), method="ibp", epochs=1, out_dir=out, name=name, **OPTS)
        runs[name] = (net.eval(), res.run_dir / "last.pt")
    return runs


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_fit_checkpoint_is_rebuilt_from_its_description(fitted, kind):
    net, path = fitted[kind]
    meta = ckpt.load_checkpoint(path)["model_meta"]
    json.dumps(meta["description"])  # declarative: plain JSON, no pickle
    model = ckpt.load_model(path)
    assert not model.training and model.input_spec is None
    x = D.load("synthetic", "test", limit=16).images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_cli_verbs_take_a_fit_checkpoint(fitted, kind, tmp_path, capsys):
    _, path = fitted[kind]
    with pytest.raises(SystemExit, match="names no dataset.*certdist.fit.*pass --dataset"):
        main(["evaluate", "--checkpoint", str(path), "--limit", "8"])
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(path), "--dataset", "synthetic", "--limit", "20", "--pgd-steps", "2",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 20 and res["eps"] == pytest.approx(0.1) and res["arch"] == "sequential"
    cert = tmp_path / "cert.jsonl"
    assert main(["certify", "--checkpoint", str(path), "--dataset", "synthetic", "--limit", "3", "--timeout", "2",
                 "--attack-steps", "5", "--restarts", "1", "--out", str(cert)]) == 0
    assert len(cert.read_text().splitlines()) == 3
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(path), "--dataset", "synthetic", "--eps", "0.1", "--limit", "2",
                 "--out", str(exp)]) == 0
    assert (exp / "onnx" / "model.onnx").is_file() and (exp / "instances.csv").is_file()
    capsys.readouterr()
    # a dataset of another shape: a clear message, not a traceback
    with pytest.raises(SystemExit, match="'mnist' has 1x28x28 images.*does not take these images"):
        from certdist.cli import _check_fits
        _check_fits(ckpt.load_model(path), "mnist", torch.zeros(1, 1, 28, 28))


def test_fit_takes_a_fit_checkpoint_as_teacher(fitted, tmp_path):
    _, path = fitted["mlp"]
    r = certdist.fit(tiny_mlp(), synthetic_loader(128), method="cc-ibp", teacher=path, epochs=1, out_dir=tmp_path,
                     name="dist", distill={"beta": 0.01}, **OPTS)
    assert r.results["teacher"] == str(path) and "train_dist" in r.metrics[0]


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class MyLinear(nn.Linear):  # a subclass may compute something else: not described as a Linear
    pass


def test_a_module_that_cannot_be_described_is_named(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), Doubler(), nn.Linear(3, 2))
    with pytest.raises(DescriptionError, match=r"layer '2' of type .*Doubler"):
        describe(net)
    with pytest.raises(DescriptionError, match=r"layer '1.0' of type .*MyLinear"):
        describe(nn.Sequential(nn.Flatten(), nn.Sequential(MyLinear(4, 2))))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ckpt.warn_if_not_describable(net)
    assert any("Doubler" in str(x.message) and "weights only" in str(x.message) for x in w)
    view = certdist.models.as_certifiable(net)
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"model": net.state_dict(), "model_meta": ckpt.model_meta(view, net)})
    with pytest.raises(ckpt.CheckpointError, match=r"only the weights.*layer '2' of type .*Doubler"):
        ckpt.load_model(path)


def test_descriptions_round_trip_through_json():
    from conftest import random_net

    class Net(nn.Sequential):  # a Sequential subclass that keeps Sequential.forward is a plain chain
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for net in [random_net("mlp", 0), random_net("conv", 1), random_net("conv_bn", 2), Net()]:
        net.eval()
        twin = build_from_description(json.loads(json.dumps(describe(net))))
        twin.load_state_dict(net.state_dict())
        twin.eval()
        spec = getattr(net, "input_spec", None)
        x = torch.rand(3, spec.channels, spec.size, spec.size) if spec else torch.rand(3, 1, 2, 2)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), net(x))
        assert getattr(twin, "input_spec", None) == spec
    with pytest.raises(DescriptionError, match="unsupported architecture description format"):
        build_from_description({"format": "pickle"})


def test_certdist_train_takes_a_fit_checkpoint_as_teacher(fitted, tmp_path):
    _, path = fitted["mlp"]  # no input spec saved: the teacher is checked by its outputs, not refused
    assert main(["train", "data.dataset=synthetic", "model.arch=mlp", "method=cc-ibp", "eps=0.1", "epochs=1",
                 "warmup_epochs=0", "ramp_epochs=1", "lr_milestones=[]", "progress=false", "data.train_limit=128",
                 "data.test_limit=20", "eval.pgd_steps=1", f"distill.teacher={path}", "distill.projection=true",
                 "distill.beta=0.01", f"out_dir={tmp_path}", "name=t"]) == 0
    assert json.loads((tmp_path / "t" / "seed0" / "results.json").read_text())["teacher"] == str(path)
