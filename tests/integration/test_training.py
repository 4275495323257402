"""The training loop end to end on the generated ``synthetic`` dataset (no files, seconds)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from certdist.cli import main
from certdist.config import load_config
from certdist.training import checkpoint as ckpt
from certdist.training import loop
from certdist.training.loop import TrainingError, train

BASE = ["data.dataset=synthetic", "model.arch=mlp", "eps=0.1", "epochs=3", "warmup_epochs=1", "ramp_epochs=1",
        "batch_size=128", "lr=1e-3", "lr_milestones=[2]", "progress=false", "eval.pgd_steps=5",
        "data.train_limit=512", "data.test_limit=200"]
# one- or two-epoch runs: a ramp that fits (a longer one is refused) and no lr milestone past the last epoch
SHORT = ["warmup_epochs=0", "ramp_epochs=1", "lr_milestones=[]"]


def cfg(tmp_path, *extra):
    return load_config(None, BASE + [f"out_dir={tmp_path}"] + list(extra))


@pytest.mark.parametrize("method", ["standard", "pgd-at", "ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp"])
def test_every_method_trains(tmp_path, method):
    run = train(cfg(tmp_path, f"method={method}", f"name={method}", "attack.steps=2"))
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == method and res["n"] == 200
    assert 0 <= res["ibp_cert_acc"] <= res["pgd_acc"] <= res["clean_acc"] <= 100
    assert res["clean_acc"] > 40  # 4 classes: better than chance after 3 short epochs
    payload = ckpt.load_checkpoint(run / "last.pt")
    assert payload["finished"] and payload["epoch"] == 2
    assert (run / "config.yaml").exists() and (run / "metrics.csv").read_text().count("\n") == 4
    import csv
    rows = list(csv.DictReader((run / "metrics.csv").open()))  # the clean accuracy of every epoch, ramp included
    assert all(0 <= float(r["train_clean_acc"]) <= 1 for r in rows)
    assert res["train_eps_reached"] == res["train_eps"] == (0.0 if method == "standard" else 0.1)


def test_ibp_training_certifies(tmp_path):
    run = train(cfg(tmp_path, "method=ibp", "epochs=6", "ramp_epochs=2", "data.train_limit=2000", "lr=2e-3"))
    res = json.loads((run / "results.json").read_text())
    assert res["ibp_cert_acc"] > 50, res


def kill_after_first_checkpoint(c, monkeypatch):
    """Train ``c`` and interrupt it right after its first checkpoint is written."""
    real_save = loop._save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(loop, "_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(c)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    full = train(cfg(tmp_path / "a", "method=cc-ibp", "name=r"))
    c = cfg(tmp_path / "b", "method=cc-ibp", "name=r")
    kill_after_first_checkpoint(c, monkeypatch)  # the same run, killed, then resumed
    resumed = train(c, resume=True)
    assert [r.split(",")[0] for r in (resumed / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    a = ckpt.load_checkpoint(full / "last.pt")["model"]
    b = ckpt.load_checkpoint(resumed / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_never_overwrites_silently(tmp_path):
    c = cfg(tmp_path, "method=standard", "epochs=1", *SHORT)
    train(c)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(c)
    with pytest.raises(TrainingError, match="finished; nothing to resume"):
        train(c, resume=True)
    train(c, overwrite=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    c = cfg(tmp_path, "method=ibp")
    real = loop.compute_loss
    state = {"n": 0}
    steps_per_epoch = 4

    def nan_in_second_epoch(*a, **k):
        loss, stats = real(*a, **k)
        state["n"] += 1
        if state["n"] > steps_per_epoch:
            loss = loss * float("nan")
            stats["loss"] = float("nan")
        return loss, stats
    monkeypatch.setattr(loop, "compute_loss", nan_in_second_epoch)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2.*last good checkpoint is kept"):
        train(c)
    payload = ckpt.load_checkpoint(tmp_path / "run" / "seed0" / "last.pt")
    assert payload["epoch"] == 0 and not payload["finished"]
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_architecture(tmp_path):
    run = train(cfg(tmp_path, "method=standard", "epochs=1", *SHORT))
    payload = ckpt.load_checkpoint(run / "last.pt")
    from certdist.models import build_model
    other = build_model("mlp", ckpt.InputSpec(1, 8, 10, (0.3,), (0.3,)))
    with pytest.raises(ckpt.CheckpointError, match="does not fit architecture 'mlp'.*shape mismatch"):
        ckpt.load_weights(other, payload["model"], source="x.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds a 'mlp' model, expected 'cnn7'"):
        ckpt.model_from_checkpoint(run / "last.pt", expect_arch="cnn7")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.model_from_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.model_from_checkpoint(tmp_path / "missing.pt")


def test_cli_train_evaluate_and_errors(tmp_path, capsys):
    assert main(["train", *BASE, *SHORT, f"out_dir={tmp_path}", "method=ibp", "name=cli", "epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "| synthetic | mlp | ibp |" in out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cli" / "seed0" / "last.pt"), "--limit", "100"]) == 0
    assert (tmp_path / "cli" / "seed0" / "eval_eps0.1.json").exists()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cli" / "seed0" / "last.pt"), "--limit", "50",
                 "--attack", "apgd", "--pgd-steps", "10"]) == 0
    assert json.loads((tmp_path / "cli" / "seed0" / "eval_eps0.1_apgd.json").read_text())["attack"] == "apgd"
    assert main(["train", *BASE, f"out_dir={tmp_path}", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    assert main(["train", *BASE, f"out_dir={tmp_path}", "eps=-1"]) == 2
    assert "eps: must be >= 0" in capsys.readouterr().err


def test_table_sweep_and_plot(tmp_path, capsys):
    assert main(["sweep", *BASE, *SHORT, f"out_dir={tmp_path}", "method=ibp", "name=sw", "epochs=1", "--seeds", "0",
                 "1"]) == 0
    out = capsys.readouterr().out
    assert "| synthetic | mlp | ibp | - | 0.1 | 2 | 200 |" in out and "±" in out  # seeds, then test points
    assert main(["table", str(tmp_path / "sw")]) == 0
    assert main(["train", *BASE, *SHORT, f"out_dir={tmp_path}", "method=ibp", "name=sw", "epochs=1", "seed=2",
                 "lr=0.01"]) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out  # another setting under the same name: its own row, not a third seed
    assert "| sw (lr=0.01) | synthetic | mlp | ibp | - | 0.1 | 1 | 200 |" in out and "| 0.1 | 2 | 200 |" in out
    png = tmp_path / "c.png"
    assert main(["plot", str(tmp_path / "sw" / "seed0"), str(tmp_path / "sw" / "seed1"), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_resume_rejects_a_changed_config_but_not_runtime_settings(tmp_path, monkeypatch):
    kill_after_first_checkpoint(cfg(tmp_path, "method=ibp", "epochs=2", *SHORT), monkeypatch)
    with pytest.raises(TrainingError,
                       match=r"resume=True \(CLI: --resume\) with a different config.*keys differ: \['lr'\]"):
        train(cfg(tmp_path, "method=ibp", "epochs=2", *SHORT, "lr=0.01"), resume=True)
    run = train(cfg(tmp_path, "method=ibp", "epochs=2", *SHORT, "progress=true", "num_threads=1", "eval.limit=50"),
                resume=True)
    assert json.loads((run / "results.json").read_text())["n"] == 50  # eval settings may change on resume


def test_sweep_refuses_to_reuse_a_run_with_other_settings(tmp_path):
    from certdist.sweep import sweep
    sweep([None], [0], BASE + SHORT + [f"out_dir={tmp_path}", "method=ibp", "name=sw", "epochs=1"])
    with pytest.raises(TrainingError, match=r"other settings \(keys differ: \['epochs'\]\)"):
        sweep([None], [0], BASE + SHORT + [f"out_dir={tmp_path}", "method=ibp", "name=sw", "epochs=2"])


def test_parallel_sweep_splits_the_cores(tmp_path):
    from certdist.sweep import sweep
    dirs = sweep([None], [0, 1], BASE + SHORT + [f"out_dir={tmp_path}", "method=ibp", "name=par", "epochs=1"], jobs=2)
    want = max(1, (os.cpu_count() or 1) // 2)
    assert [json.loads((d / "results.json").read_text())["config"]["num_threads"] for d in dirs] == [want, want]


def test_validation_split_is_held_out_and_evaluated(tmp_path, monkeypatch):
    """data.validation holds out the LAST N training images: never trained on, evaluated with eval.split."""
    from certdist import data as D
    full = D.load("synthetic", "train")
    c = cfg(tmp_path, "method=standard", "data.validation=300", "eval.split=validation", "epochs=1", *SHORT,
            "data.train_limit=1000")
    tr, ev = loop.load_splits(c)
    assert len(ev) == 300 and len(tr) == 1000
    assert torch.equal(ev.images, full.images[-300:]) and torch.equal(tr.images, full.images[:1000])
    assert len(loop.load_splits(cfg(tmp_path, "data.validation=300"))[0]) == 512  # test split still evaluated
    assert len(loop.load_splits(cfg(tmp_path, "data.validation=300", "data.train_limit=null"))[0]) == 1700
    seen = []
    real_iter = loop._batch_iter
    monkeypatch.setattr(loop, "_batch_iter", lambda data, *a, **k: seen.append(len(data)) or real_iter(data, *a, **k))
    run = train(c)
    res = json.loads((run / "results.json").read_text())
    assert seen == [1000] and res["n"] == 300 and res["split"] == "validation"
    # the per-epoch columns name the split they were measured on
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_clean" in header and "val_ibp_cert" in header and not any(k.startswith("test_") for k in header)
    from certdist.reporting import _final_point, eval_prefix
    import csv
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert eval_prefix(rows[-1]) == "val"
    (run / "results.json").unlink()  # an unfinished run: its last epoch's validation numbers
    assert _final_point(run, rows) == (float(rows[-1]["val_clean"]), float(rows[-1]["val_ibp_cert"]))
    with pytest.raises(ValueError, match="validation: need 1 <= N < 2000"):
        D.holdout(full, 2000)


def test_cli_refuses_a_config_whose_ramp_does_not_fit_in_epochs(tmp_path, capsys):
    """configs/small/mnist_cc-ibp.yaml ramps eps over epochs 2-6: with epochs=3 the run would end at eps 0.046
    of the training eps 0.2 and report eps 0.1 as if trained for it."""
    assert main(["train", "--config", "small/mnist_cc-ibp.yaml", f"out_dir={tmp_path}", "epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "warmup_epochs + ramp_epochs" in err and "(epochs=3)" in err and "leave warmup_epochs" in err
    assert not any(tmp_path.iterdir())


def test_a_ramp_that_takes_the_last_epoch_warns_and_the_eps_reached_is_recorded(tmp_path):
    with pytest.warns(loop.ScheduleWarning, match=r"ends at training eps 0\.\d+, \d+\.\d % of the 0\.2 asked for"):
        run = train(cfg(tmp_path, "method=ibp", "name=short", "epochs=1", *SHORT, "train_eps_mul=2"))
    res = json.loads((run / "results.json").read_text())
    assert res["eps"] == 0.1 and res["train_eps"] == 0.2 and 0 < res["train_eps_reached"] < 0.2
    assert ckpt.load_checkpoint(run / "last.pt")["results"]["train_eps_reached"] == res["train_eps_reached"]
