"""CC-Dist end to end on the synthetic dataset: the teacher stays frozen, variants train, errors are clear."""
from __future__ import annotations

import json

import pytest
import torch

from certdist.config import load_config
from certdist.training import checkpoint as ckpt
from certdist.training import loop
from certdist.training.loop import TrainingError, train

BASE = ["data.dataset=synthetic", "eps=0.1", "warmup_epochs=1", "ramp_epochs=1", "batch_size=128",
        "lr=1e-3", "lr_milestones=[]", "progress=false", "eval.pgd_steps=3", "data.train_limit=512",
        "data.test_limit=100"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for arch in ("mlp", "cnn7"):
        c = load_config(None, BASE + [f"out_dir={root}", f"name={arch}", "method=pgd-at", "epochs=2",
                                      f"model.arch={arch}", "model.init=default", "attack.steps=3",
                                      "attack.step_size=0.5"])
        out[arch] = train(c) / "last.pt"
    return out


def student(tmp_path, teacher, *extra):
    return load_config(None, BASE + [f"out_dir={tmp_path}", "model.arch=mlp", "method=cc-ibp", "epochs=2",
                                     f"distill.teacher={teacher}", *extra])


def test_teacher_frozen_and_unchanged(tmp_path, teachers, monkeypatch):
    # cnn7 teacher (BatchNorm buffers) through a projection onto the mlp student's 64 features
    before = ckpt.load_checkpoint(teachers["cnn7"])["model"]
    seen = {}
    real = loop.load_teacher

    def spy(*a, **k):
        t = real(*a, **k)
        seen["teacher"] = t
        return t
    monkeypatch.setattr(loop, "load_teacher", spy)
    run = train(student(tmp_path, teachers["cnn7"], "distill.projection=true"))
    t = seen["teacher"]
    assert not t.model.training
    assert all(not p.requires_grad and p.grad is None for p in t.model.parameters())
    after = t.model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"teacher {k} changed")
    assert t.cached.all(), "clean-input features cached for every training example"
    payload = ckpt.load_checkpoint(run / "last.pt")
    assert "projection" in payload and payload["projection"]["weight"].shape == (512, 64)
    assert json.loads((run / "results.json").read_text())["teacher"] == str(teachers["cnn7"])


@pytest.mark.parametrize("extra", [
    ["distill.level=logits"],
    ["distill.teacher_input=adversarial"],
    ["method=ibp"], ["method=sabr"], ["method=mtl-ibp"], ["method=exp-ibp"],
    ["distill.alpha=0.5", "distill.beta=0.05"],
])
def test_variants_train(tmp_path, teachers, extra):
    run = train(student(tmp_path, teachers["mlp"], *extra))
    rows = (run / "metrics.csv").read_text()
    assert "train_dist" in rows.splitlines()[0]
    res = json.loads((run / "results.json").read_text())
    assert res["clean_acc"] > 30


def test_distillation_changes_training(tmp_path, teachers):
    """beta > 0 must actually change the student (the term is not silently dropped)."""
    a = train(student(tmp_path / "a", teachers["mlp"], "distill.beta=0.0"))
    b = train(student(tmp_path / "b", teachers["mlp"], "distill.beta=1.0"))
    wa = ckpt.load_checkpoint(a / "last.pt")["model"]
    wb = ckpt.load_checkpoint(b / "last.pt")["model"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_missing_teacher(tmp_path):
    with pytest.raises(TrainingError, match="teacher checkpoint not found"):
        train(student(tmp_path, tmp_path / "nope.pt"))


def test_feature_size_mismatch_without_projection(tmp_path, teachers):
    with pytest.raises(TrainingError, match=r"512 dimensions, the student's 64.*distill.projection=true"):
        train(student(tmp_path, teachers["cnn7"]))


def test_teacher_of_another_dataset(tmp_path, teachers):
    payload = ckpt.load_checkpoint(teachers["mlp"])
    payload["config"]["data"]["dataset"] = "mnist"
    ckpt.save_checkpoint(tmp_path / "t.pt", payload)
    with pytest.raises(TrainingError, match="trained on 'mnist', the student on 'synthetic'"):
        train(student(tmp_path, tmp_path / "t.pt"))
