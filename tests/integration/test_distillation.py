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
    """A student of the paper's form (feature box) unless ``extra`` says otherwise."""
    return load_config(None, BASE + [f"out_dir={tmp_path}", "model.arch=mlp", "method=cc-ibp", "epochs=2",
                                     f"distill.teacher={teacher}", "distill.loss=box", *extra])


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
    ["distill.loss=point"],
    ["distill.features=standardized", "distill.beta_schedule=decay"],
    ["distill.features=normalized", "distill.beta_schedule=late", "epochs=3"],
    ["distill.loss=kl", "distill.level=logits", "distill.temperature=2"],
])
def test_variants_train(tmp_path, teachers, extra):
    run = train(student(tmp_path, teachers["mlp"], *extra))
    rows = (run / "metrics.csv").read_text()
    head = rows.splitlines()[0].split(",")
    assert {"train_dist", "train_dist_weighted", "train_cert_loss", "train_teacher_norm", "train_feat_width"} <= set(head)
    assert ("train_dist_width" in head) == ("distill.loss=point" not in extra and "distill.loss=kl" not in extra)
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


def test_scale_free_targets_use_teacher_training_statistics(tmp_path, teachers, monkeypatch):
    """distill.features=standardized: the teacher's cached training-set features, shifted and scaled by
    the teacher's statistics, have mean 0 and std 1 in every live dimension."""
    seen = {}
    real = loop.load_teacher
    monkeypatch.setattr(loop, "load_teacher", lambda *a, **k: seen.setdefault("t", real(*a, **k)))
    train(student(tmp_path, teachers["mlp"], "distill.features=standardized", "epochs=1", "warmup_epochs=0"))
    t = seen["t"]
    assert t.cached.all()
    z = (t.cache - t.shift) / t.scale
    live = t.cache.std(0) > 0.01 * t.cache.std(0).mean()
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False)[live], torch.ones(int(live.sum())), atol=1e-3, rtol=0)


def test_beta_schedule_late_is_cc_ibp_until_the_ramp_ends(tmp_path, teachers):
    """'late': no distillation during warm-up and ramp, so the first two epochs equal plain CC-IBP's."""
    a = train(student(tmp_path / "a", teachers["mlp"], "distill.beta_schedule=late", "distill.beta=1.0"))
    b = train(student(tmp_path / "b", teachers["mlp"], "distill.beta=0.0"))
    wa = ckpt.load_checkpoint(a / "last.pt")["model"]
    wb = ckpt.load_checkpoint(b / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


def test_diagnosis_columns_and_plot(tmp_path, teachers):
    """metrics.csv splits the box term into centre + width parts (they add up), and the diagnosis plot
    draws runs with and without a teacher."""
    import csv

    from certdist.reporting import plot_diagnosis
    run = train(student(tmp_path, teachers["mlp"], "distill.beta=0.05"))
    plain = train(load_config(None, BASE + [f"out_dir={tmp_path}", "model.arch=mlp", "method=cc-ibp", "epochs=2",
                                            "name=plain"]))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for r in rows:
        parts = float(r["train_dist_centre"]) + float(r["train_dist_width"])
        assert parts == pytest.approx(float(r["train_dist"]), rel=1e-3)
        assert float(r["train_dist_weighted"]) == pytest.approx(0.05 * float(r["train_dist"]), rel=1e-3)
    assert float(rows[-1]["train_dist_width"]) > 0 and float(rows[0]["train_dist_width"]) == 0  # warm-up: no box
    png = plot_diagnosis([run, plain], tmp_path / "d.png")
    assert png.stat().st_size > 1000
