"""Imported models everywhere (issue 21 part 4): ``certdist evaluate / certify / export --checkpoint model.onnx``
and ONNX teachers (``fit(teacher="model.onnx")``, ``distill.teacher=model.onnx``), through the one loader
``certdist.training.checkpoint.load_model``."""
from __future__ import annotations

import gzip
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("onnx")

import certdist  # noqa: E402
from certdist import data as D  # noqa: E402
from certdist.cli import main  # noqa: E402
from certdist.training import checkpoint as ckpt  # noqa: E402

OPTS = dict(eps=0.1, warmup_epochs=0, ramp_epochs=1, lr=3e-3, lr_milestones=[], progress=False, batch_size=64,
            eval={"pgd_steps": 2})
CERTIFY = ["--limit", "3", "--timeout", "5", "--attack-steps", "10", "--restarts", "1", "--max-domains", "20"]


def tiny_mlp(width: int = 16) -> nn.Sequential:
    return nn.Sequential(certdist.Normalize([0.3], [0.3]), nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                         nn.Linear(width, 4))


class FlatInput(nn.Module):
    """The same function on flat [N, 64] inputs, normalised by constants (exported as Sub / Div) or not."""

    def __init__(self, net: nn.Sequential, normalise: bool) -> None:
        super().__init__()
        self.body, self.normalise = net[2:], normalise

    def forward(self, x):
        return self.body((x - 0.3) / 0.3 if self.normalise else x)


def synthetic_loader(n: int = 256) -> DataLoader:
    d = D.load("synthetic", "train", limit=n)
    return DataLoader(TensorDataset(d.images, d.labels), batch_size=64, shuffle=True)


def torch_export(model: nn.Module, shape, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(shape), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A briefly trained MLP's checkpoint and ONNX files: the image input ([1, 1, 8, 8], also gzipped), a flat
    input [N, 64] normalised inside (Sub / Div) and a flat input without normalisation (the weights then see
    the normalised images: another function, only used for the shape path)."""
    out = tmp_path_factory.mktemp("onnx_ckpt")
    torch.manual_seed(0)
    net = tiny_mlp()
    res = certdist.fit(net, synthetic_loader(), method="ibp", epochs=1, out_dir=out, name="mlp", **OPTS)
    net.eval()
    paths = {"pt": res.run_dir / "last.pt", "image": out / "image.onnx", "gz": out / "image.onnx.gz",
             "flat_norm": out / "flat_norm.onnx", "flat": out / "flat.onnx", "flat784": out / "flat784.onnx"}
    torch_export(net, (1, 1, 8, 8), paths["image"])
    paths["gz"].write_bytes(gzip.compress(paths["image"].read_bytes()))
    torch_export(FlatInput(net, True), (1, 64), paths["flat_norm"])
    torch_export(FlatInput(net, False), (1, 64), paths["flat"])
    torch_export(nn.Sequential(nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 4)), (1, 784), paths["flat784"])
    return net, paths


def test_load_model_dispatches_on_the_suffix(models):
    net, paths = models
    x = D.load("synthetic", "test", limit=16).images.float() / 255
    for kind in ("image", "gz", "flat_norm"):
        model = ckpt.load_model(paths[kind], input_shape=(1, 8, 8), num_classes=4)
        assert model.arch == "onnx" and model.input_spec is None and not model.training
        assert model.feature_dim == 16 and model.num_classes == 4  # features: the input of the last Linear
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)  # the same float32 function
    flat = ckpt.load_model(paths["flat"], input_shape=(1, 8, 8))
    assert isinstance(flat.features[0], nn.Flatten)  # a flat model: a Flatten in front (exact)
    with torch.no_grad():
        torch.testing.assert_close(flat(x), net[2:](x.flatten(1)), rtol=0, atol=0)
    assert ckpt.load_model(paths["image"]).onnx_input.model_shape == (1, 8, 8)  # no shape: as the file reads


def test_a_wrong_input_shape_is_named(models, tmp_path, capsys):
    _, paths = models
    with pytest.raises(ckpt.CheckpointError, match=r"takes inputs of shape \[1, 784\].*1x8x8 images: 784 values "
                       r"vs 64"):
        ckpt.load_model(paths["flat784"], input_shape=(1, 8, 8))
    with pytest.raises(ckpt.CheckpointError, match="has 4 outputs, the dataset 10 classes"):
        ckpt.load_model(paths["image"], input_shape=(1, 8, 8), num_classes=10)
    assert main(["evaluate", "--checkpoint", str(paths["flat784"]), "--dataset", "synthetic", "--eps", "0.1",
                 "--limit", "3", "--out", str(tmp_path / "e.json")]) == 2
    assert "takes inputs of shape [1, 784]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="an ONNX file records no dataset and no eps: pass --dataset and --eps"):
        main(["certify", "--checkpoint", str(paths["image"]), "--limit", "3"])
    with pytest.raises(SystemExit, match="records no dataset and no eps: pass --eps"):
        main(["certify", "--checkpoint", str(paths["image"]), "--dataset", "synthetic", "--limit", "3"])


def _verdicts(path):
    return [(r["index"], r["status"], r["stage"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("kind", ["image", "flat_norm"])
def test_cli_verbs_on_an_onnx_file_give_the_checkpoints_numbers(models, kind, tmp_path, capsys):
    _, paths = models
    common = ["--dataset", "synthetic", "--eps", "0.1"]
    res = {}
    for src in ("pt", kind):
        out = tmp_path / f"eval_{src}.json"
        assert main(["evaluate", "--checkpoint", str(paths[src]), *common, "--limit", "20", "--pgd-steps", "5",
                     "--out", str(out)]) == 0
        res[src] = json.loads(out.read_text())
    assert res[kind]["arch"] == "onnx" and res[kind]["n"] == 20
    for key in ("clean_acc", "robust_acc", "pgd_acc", "ibp_cert_acc"):
        assert res[kind][key] == res["pt"][key], key
    assert 0 < res["pt"]["robust_acc"] < res["pt"]["clean_acc"]
    cert = {}
    for src in ("pt", kind):  # at eps 0.01 the three points are verified by IBP, misclassified, verified by CROWN
        cert[src] = tmp_path / f"cert_{src}.jsonl"
        assert main(["certify", "--checkpoint", str(paths[src]), "--dataset", "synthetic", "--eps", "0.01", *CERTIFY,
                     "--out", str(cert[src])]) == 0
    verdicts = _verdicts(cert[kind])
    assert len(verdicts) == 3 and verdicts == _verdicts(cert["pt"])
    assert any(status == "verified" for _, status, _ in verdicts)
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(paths[kind]), *common, "--limit", "2", "--out", str(exp)]) == 0
    assert (exp / "onnx" / "model.onnx").is_file() and (exp / "instances.csv").is_file()
    capsys.readouterr()


def test_fit_takes_an_onnx_teacher_of_another_width(models, tmp_path):
    _, paths = models
    r = certdist.fit(tiny_mlp(12), synthetic_loader(128), method="cc-ibp", teacher=paths["flat_norm"], epochs=1,
                     out_dir=tmp_path, name="dist", distill={"beta": 0.01, "projection": True}, **OPTS)
    assert r.results["teacher"] == str(paths["flat_norm"]) and "train_dist" in r.metrics[0]
    with pytest.raises(ckpt.CheckpointError, match=r"\[1, 784\]"):
        certdist.fit(tiny_mlp(), synthetic_loader(128), method="cc-ibp", teacher=paths["flat784"], epochs=1,
                     out_dir=tmp_path, name="bad", distill={"beta": 0.01}, **OPTS)
    assert not (tmp_path / "bad").exists()  # refused before a run folder is made


def test_certdist_train_takes_an_onnx_teacher(models, tmp_path, capsys):
    _, paths = models
    assert main(["train", "data.dataset=synthetic", "model.arch=mlp", "method=cc-ibp", "eps=0.1", "epochs=1",
                 "warmup_epochs=0", "ramp_epochs=1", "lr_milestones=[]", "progress=false", "data.train_limit=128",
                 "data.test_limit=20", "eval.pgd_steps=1", f"distill.teacher={paths['gz']}", "distill.projection=true",
                 "distill.beta=0.01", f"out_dir={tmp_path}", "name=t"]) == 0
    assert json.loads((tmp_path / "t" / "seed0" / "results.json").read_text())["teacher"] == str(paths["gz"])
    assert main(["train", "data.dataset=synthetic", "model.arch=mlp", "method=cc-ibp", "eps=0.1", "epochs=1",
                 "progress=false", "data.train_limit=128", f"distill.teacher={paths['flat784']}",
                 "distill.projection=true", f"out_dir={tmp_path}", "name=bad"]) == 2
    assert "teacher: the ONNX model" in capsys.readouterr().err


class NHWC(nn.Module):
    """An NHWC-input network (as tf2onnx writes them): a Transpose to NCHW first, or, without it, the HWC
    pixels flattened as they come."""

    def __init__(self, transpose: bool) -> None:
        super().__init__()
        self.transpose = transpose
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2) if self.transpose else x)


def test_nhwc_inputs_take_nchw_images_or_are_refused(tmp_path):
    torch.manual_seed(2)
    for transpose in (True, False):
        torch_export(NHWC(transpose), (1, 4, 4, 3), tmp_path / f"nhwc{transpose}.onnx")
    torch.manual_seed(2)
    net = NHWC(True).eval()  # the exported network's weights
    model = ckpt.load_model(tmp_path / "nhwcTrue.onnx", input_shape=(3, 4, 4), num_classes=3)
    x = torch.rand(5, 3, 4, 4)
    with torch.no_grad():  # the model takes NCHW images: the file's own Transpose is absorbed by load_onnx
        torch.testing.assert_close(model(x), net(x.permute(0, 2, 3, 1)), rtol=0, atol=0)
    with pytest.raises(ckpt.CheckpointError, match=r"reads the pixels in another order"):
        ckpt.load_model(tmp_path / "nhwcFalse.onnx", input_shape=(3, 4, 4))
