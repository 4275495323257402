"""certdist.fit on one's own nn.Sequential and DataLoader (the loop of `certdist train`), and the command
line's answers to the usual slips (no raw tracebacks, no work thrown away)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certdist
from certdist.cli import main
from certdist.training import checkpoint as ckpt
from certdist.training import loop
from certdist.training.loop import TrainingError

BASE = ["data.dataset=synthetic", "model.arch=mlp", "eps=0.1", "epochs=1", "warmup_epochs=0", "ramp_epochs=1",
        "batch_size=128", "lr_milestones=[]", "progress=false", "eval.pgd_steps=2", "data.train_limit=256",
        "data.test_limit=50"]


def blobs(n: int, seed: int) -> TensorDataset:
    """4 classes of 1x6x6 images around fixed prototypes, in [0, 1]."""
    protos = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (protos[y] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return TensorDataset(x, y)


def small_net() -> nn.Sequential:
    return nn.Sequential(certdist.Normalize([0.5], [0.3]), nn.Flatten(), nn.Linear(36, 32), nn.ReLU(),
                         nn.Linear(32, 4))


OPTS = dict(eps=0.05, warmup_epochs=0, ramp_epochs=1, lr=3e-3, lr_milestones=[], progress=False, batch_size=64,
            eval={"pgd_steps": 3})


def test_fit_trains_a_sequential_with_checkpoints_and_exact_resume(tmp_path, monkeypatch):
    torch.manual_seed(0)
    train = DataLoader(blobs(256, 0), batch_size=64, shuffle=True)
    test = DataLoader(blobs(100, 1), batch_size=50)
    net = small_net()
    res = certdist.fit(net, train, method="cc-ibp", epochs=3, test_loader=test, out_dir=tmp_path, name="full", **OPTS)
    assert res.model is net and res.run_dir == tmp_path / "full" / "seed0"
    assert res.results["clean_acc"] > 80 and res.results["ibp_cert_acc"] > 30, res.results
    assert len(res.metrics) == 3 and res.results["method"] == "cc-ibp" and res.results["arch"] == "sequential"
    payload = ckpt.load_checkpoint(res.run_dir / "last.pt")
    assert payload["finished"] and set(payload["model"]) == set(net.state_dict())  # the user's own keys
    rebuilt = ckpt.load_model(res.run_dir / "last.pt")  # from the architecture description saved with it
    x = blobs(8, 5).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net.eval()(x))

    # killed after the first epoch's checkpoint, then resumed: the same weights as the uninterrupted run
    real_save = loop._save

    def save_then_die(path, *a, **k):
        real_save(path, *a, **k)
        raise KeyboardInterrupt
    torch.manual_seed(0)
    net2 = small_net()
    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        certdist.fit(net2, train, method="cc-ibp", epochs=3, test_loader=test, out_dir=tmp_path, name="cut", **OPTS)
    monkeypatch.setattr(loop, "_save", real_save)
    torch.manual_seed(123)  # resuming restores the RNG state, whatever happened in between
    net3 = small_net()
    again = certdist.fit(net3, train, method="cc-ibp", epochs=3, test_loader=test, out_dir=tmp_path, name="cut",
                         resume=True, **OPTS)
    for (k, a), b in zip(net.state_dict().items(), net3.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert again.results["clean_acc"] == res.results["clean_acc"]
    with pytest.raises(TrainingError, match="already holds a run"):
        certdist.fit(small_net(), train, method="ibp", epochs=1, out_dir=tmp_path, name="full", **OPTS)


def test_fit_with_a_teacher_module_or_checkpoint(tmp_path):
    torch.manual_seed(1)
    train = DataLoader(blobs(256, 2), batch_size=64, shuffle=True)
    teacher = small_net()
    t = certdist.fit(teacher, train, method="pgd-at", epochs=1, out_dir=tmp_path, name="teacher", **OPTS)
    assert t.results.get("clean_acc") is None  # no test_loader: no test metrics
    student = small_net()
    r = certdist.fit(student, train, method="cc-ibp", teacher=teacher, epochs=1, out_dir=tmp_path, name="dist",
                     distill={"beta": 0.01}, **OPTS)
    assert "train_dist" in r.metrics[0] and r.results["teacher"].startswith("<in-memory Sequential")
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher is left alone
    # scale-free targets take the teacher's statistics over the DataLoader's batches
    std = certdist.fit(small_net(), train, method="cc-ibp", teacher=teacher, epochs=1, out_dir=tmp_path,
                       name="dist-std", distill={"beta": 0.01, "loss": "box", "features": "standardized"}, **OPTS)
    assert math.isfinite(float(std.metrics[0]["train_dist"]))
    with pytest.raises(TrainingError, match="teacher checkpoint not found"):
        certdist.fit(small_net(), train, method="cc-ibp", teacher=tmp_path / "nope.pt", epochs=1, out_dir=tmp_path,
                     name="x", **OPTS)
    with pytest.raises(TypeError, match="config section 'data'"):
        certdist.fit(small_net(), train, data={"dataset": "mnist"})
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        certdist.fit(small_net(), [(torch.full((4, 1, 6, 6), 2.0), torch.zeros(4, dtype=torch.long))],
                     method="ibp", epochs=1, out_dir=tmp_path, name="bad", **OPTS)


def test_evaluate_and_certify_take_dataloaders():
    torch.manual_seed(0)
    net = small_net().eval()
    loader = DataLoader(blobs(40, 3), batch_size=16)
    r = certdist.evaluate(net, loader, "2/255", attack="apgd", steps=3)
    assert r["n"] == 40 and r["eps"] == pytest.approx(2 / 255) and r["attack"] == "apgd"
    s = certdist.certify(net, loader, 0.01, limit=5, timeout=2)
    assert s["n"] == 5 and len(s["records"]) == 5
    with pytest.raises(ValueError, match="limit must be >= 1"):
        certdist.evaluate(net, loader, 0.01, limit=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["train", *BASE, f"out_dir={out}", "method=ibp", "name=r"]) == 0
    return out / "r" / "seed0"


def test_evaluate_refuses_to_overwrite_before_attacking(run_dir, monkeypatch, capsys):
    import certdist.evaluation as ev
    (run_dir / "eval_eps0.1.json").write_text("{}")
    called = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["evaluate", "--checkpoint", str(run_dir / "last.pt")])
    assert not called
    for cmd in ("evaluate", "certify"):
        with pytest.raises(SystemExit, match="--limit must be >= 1"):
            main([cmd, "--checkpoint", str(run_dir / "last.pt"), "--limit", "0"])
    with pytest.raises(SystemExit):  # argparse: exceeds the data range
        main(["evaluate", "--checkpoint", str(run_dir / "last.pt"), "--eps", "8"])
    assert "exceeds the data range" in capsys.readouterr().err


def test_evaluate_with_autoattack_names_it(run_dir, capsys):
    out = run_dir / "aa.json"
    assert main(["evaluate", "--checkpoint", str(run_dir / "last.pt"), "--attack", "autoattack", "--eps", "80/255",
                 "--limit", "8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["attack"] == "autoattack" and res["attack_desc"].startswith("AutoAttack standard")
    assert "| AutoAttack |" in capsys.readouterr().out


def test_no_raw_tracebacks(tmp_path, monkeypatch, capsys, run_dir):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "train", interrupted)
    assert main(["train", *BASE, f"out_dir={tmp_path}"]) == 130
    assert "interrupted; rerun the same command with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert main(["train", *BASE, f"out_dir={tmp_path}", "device=cuda"]) == 2
        assert "finds no CUDA device" in capsys.readouterr().err
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(["train", *BASE, f"out_dir={tmp_path}", "logger=tensorboard"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
    monkeypatch.undo()
    assert not (tmp_path / "run").exists()  # refused before creating the run folder
    (tmp_path / "empty").mkdir()
    for cmd in (["plot", str(tmp_path / "empty")], ["table", str(tmp_path / "empty")]):
        assert main(cmd) == 2
        assert "no run" in capsys.readouterr().err.replace("finished run", "run")
    png = tmp_path / "p.png"
    assert main(["plot", str(run_dir.parent.parent), "--out", str(png)]) == 0  # a parent folder


def test_sweep_takes_overrides_after_the_seeds(tmp_path, capsys):
    assert main(["sweep", "--seeds", "0", *BASE, f"out_dir={tmp_path}", "method=ibp", "name=sw"]) == 0
    assert (tmp_path / "sw" / "seed0" / "results.json").exists()
    from certdist.cli import _split_seeds
    assert _split_seeds(["0", "1", "eps=8/255", "c.yaml"], []) == ([0, 1], ["eps=8/255", "c.yaml"])
    with pytest.raises(SystemExit, match="at least one integer seed"):
        _split_seeds(["eps=0.1"], [])


def test_train_help_lists_keys_defaults_and_methods(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "cc-ibp" in out and "distill.teacher" in out and "eval.attack" in out and "ramp_epochs" in out
    assert main(["config", "show", "--config", "small/mnist_cc-ibp.yaml", "epochs=12"]) == 0
    assert "epochs: 12" in capsys.readouterr().out
    assert main(["config", "show", "--config", "small/mnist_cc-ibp.yaml", "epochs=2"]) == 2  # its eps ramp needs 6
    assert main(["config", "list"]) == 0
    assert "small/mnist_cc-ibp.yaml" in capsys.readouterr().out


def test_a_collapse_to_chance_accuracy_is_warned_about_and_a_learning_run_is_not(tmp_path, recwarn):
    data = blobs(256, 0)
    # random labels: 1,024 of them, so that two epochs cannot memorise them above chance (clean accuracy is
    # counted on every step: 28-29 % against the 1.25 / 4 threshold over three seeds)
    noisy = blobs(1024, 0)
    noise = TensorDataset(noisy.tensors[0], torch.randint(0, 4, (1024,), generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(0)
    with pytest.warns(loop.CollapseWarning, match="chance level .*4 classes.*ramp_epochs"):
        certdist.fit(small_net(), DataLoader(noise, batch_size=64), method="pgd-at", epochs=2, out_dir=tmp_path,
                     name="noise", **OPTS)
    recwarn.clear()
    torch.manual_seed(0)
    certdist.fit(small_net(), DataLoader(data, batch_size=64, shuffle=True), method="pgd-at", epochs=2, out_dir=tmp_path,
                 name="blobs", **OPTS)
    assert not [w for w in recwarn if issubclass(w.category, loop.CollapseWarning)]


def test_the_collapse_check_waits_for_the_warm_up_and_a_second_epoch_and_names_the_settings():
    cfg = certdist.config.load_config(None, ["eps=0.3", "warmup_epochs=1", "ramp_epochs=0", "name=t", "epochs=5"])
    low = lambda e: {"epoch": e, "train_acc": 0.098}  # noqa: E731
    assert loop.collapse_message([low(1), low(2)], cfg, 10) is None  # epoch 1 is the warm-up
    assert loop.collapse_message([low(2)], cfg, 10) is None  # one slow epoch
    assert loop.collapse_message([low(2), {"epoch": 3, "train_acc": 0.13}], cfg, 10) is None  # above 1.25 / 10
    assert loop.collapse_message([low(2), {"epoch": 3, "train_cert": 0.05}], cfg, 10) is None  # certified only
    assert loop.collapse_message([low(2), {"epoch": 3, "train_acc": 0.05, "train_adv_acc": 0.5}], cfg, 10) is None
    assert loop.collapse_message([low(5)], cfg, 10) is None  # a one-epoch run's only epoch
    msg = loop.collapse_message([low(2), low(3)], cfg, 10)
    assert "epoch 3" in msg and "9.8 %" in msg and "eps 0.3" in msg and "ramp_epochs, now 0" in msg
