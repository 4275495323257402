"""certdist tune: a tiny Optuna study on synthetic data (resume, YAML configs, validation split only,
pruning, worker processes, bad space specs)."""
import csv
import json

import pytest
import yaml

pytest.importorskip("optuna")
import optuna  # noqa: E402

import certdist  # noqa: E402
from certdist import data as D  # noqa: E402
from certdist.cli import main  # noqa: E402
from certdist.config import load_config, to_dict  # noqa: E402
from certdist.tune import TuneError, parse_space, pareto_front, tune  # noqa: E402

BASE = ["data.dataset=synthetic", "model.arch=mlp", "eps=0.05", "epochs=2", "warmup_epochs=0", "ramp_epochs=1",
        "lr_milestones=[]", "eval.pgd_steps=2", "data.train_limit=256", "batch_size=64", "method=cc-ibp",
        "num_threads=1"]
SPACE = ["lr=loguniform:1e-3:1e-2", "alpha=uniform:0.05:0.5", "distill.beta=choice:0.05,0.1,0.5"]
VAL = 120


@pytest.fixture
def loads(monkeypatch):
    """Every (dataset, split) the code under test reads."""
    seen = []
    real = D.load

    def spy(name, split, *a, **k):
        seen.append(split)
        return real(name, split, *a, **k)
    monkeypatch.setattr(D, "load", spy)
    return seen


def study_of(out):
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")


def test_tune_resumes_writes_configs_and_never_reads_test(tmp_path, loads, capsys):
    out = tmp_path / "t"
    res = tune(None, SPACE, trials=2, out=out, overrides=BASE, validation=VAL, certify_front=True,
               certify_limit=3, certify_timeout=2.0, verbose=False)
    assert len(res.study.trials) == 2 and res.front
    assert set(loads) == {"train"}, f"the search read the splits {loads}"
    for t in res.study.trials:
        r = json.loads((tmp_path / "t" / "trials" / f"tune_trial{t.number:04d}" / "seed0" / "results.json").read_text())
        assert r["split"] == "validation" and r["n"] == VAL  # evaluated on the held-out tail, not on test
        assert r["config"]["data"]["validation"] == VAL and r["config"]["eval"]["split"] == "validation"
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and {"trial", "clean", "certified", "verified", "lr", "alpha", "distill.beta"} <= set(rows[0])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "trials.csv").exists()

    # the YAML of each Pareto-optimal trial loads and holds the trial's values, with the base config's split
    by_number = {t.number: t for t in res.study.trials}
    for path, row in zip(res.configs, res.front):
        cfg = load_config(path)
        t = by_number[row["trial"]]
        assert cfg.lr == pytest.approx(t.params["lr"]) and cfg.alpha == pytest.approx(t.params["alpha"])
        assert cfg.distill.beta == t.params["distill.beta"]
        assert cfg.eval.split == "test" and cfg.data.validation is None
        trial_cfg = yaml.safe_load((tmp_path / "t" / "trials" / f"tune_trial{t.number:04d}" / "seed0" / "config.yaml").read_text())
        mine = to_dict(cfg)
        for k in ("name", "out_dir", "progress"):
            mine.pop(k), trial_cfg.pop(k)
        mine["data"]["validation"], mine["eval"]["split"] = VAL, "validation"
        assert mine == trial_cfg  # the same run as the trial but for its split

    # rerunning adds trials to the study (CLI, same space as a YAML file), it does not restart it
    (tmp_path / "space.yaml").write_text("lr: loguniform:1e-3:1e-2\nalpha: {type: uniform, low: 0.05, high: 0.5}\n"
                                         "distill:\n  beta: [0.05, 0.1, 0.5]\n")
    assert main(["tune", *BASE, "--space-file", str(tmp_path / "space.yaml"), "--trials", "1", "--out", str(out),
                 "--validation", str(VAL)]) == 0
    study = study_of(out)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert len(list((out / "trials").iterdir())) == 3
    assert "Pareto front" in capsys.readouterr().out
    assert set(loads) == {"train"}

    # another space on the same study is refused; a trial folder in the way is not overwritten
    assert main(["tune", *BASE, "lr=loguniform:1e-3:1e-1", "--trials", "1", "--out", str(out),
                 "--validation", str(VAL)]) == 2
    assert "other settings" in capsys.readouterr().err
    (out / "trials" / "tune_trial0003" / "seed0").mkdir(parents=True)
    (out / "trials" / "tune_trial0003" / "seed0" / "keep.txt").write_text("x")
    with pytest.raises(TuneError, match="already holds a run"):
        tune(None, SPACE, trials=1, out=out, overrides=BASE, validation=VAL, verbose=False)
    assert (out / "trials" / "tune_trial0003" / "seed0" / "keep.txt").read_text() == "x"


def test_prune_and_workers(tmp_path, loads):
    out = tmp_path / "p"
    res = tune(None, SPACE, trials=1, out=out, overrides=BASE, validation=VAL, verbose=False, report=False)
    dists = res.study.trials[0].distributions
    for v in (99.0, 100.0, 100.0):  # three finished trials at least as good at epoch 1 (median 100 / 100)
        res.study.add_trial(optuna.trial.create_trial(params=res.study.trials[0].params, distributions=dists,
                                                      values=[v, v], user_attrs={"epoch1": [v, v]}))
    res = tune(None, SPACE, trials=1, out=out, overrides=BASE, validation=VAL, prune_after=1, verbose=False)
    last = res.study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED and last.user_attrs["pruned_at"] == 1
    assert not (out / "trials" / f"tune_trial{last.number:04d}" / "seed0" / "results.json").exists()
    assert sorted(r["trial"] for r in res.front) == [2, 3]  # the 100/100 trials dominate

    # two processes share the study: this one and a worker launched by it
    res = tune(None, SPACE, trials=2, out=out, overrides=BASE, validation=VAL, workers=2, prune=False, verbose=False)
    assert len(res.study.trials) == 7
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in res.study.trials) == 6
    assert set(loads) == {"train"}


def test_bad_specs(tmp_path, capsys):
    base = load_config(None, BASE)
    for space, msg in [
        (["alpah=uniform:0:1"], "unknown config key 'alpah'; did you mean alpha"),
        (["lr=loguniform:1e-3"], "should be loguniform:low:high"),
        (["lr=loguniform:0:1e-3"], "log range needs low > 0"),
        (["lr=uniform:1e-2:1e-3"], "need low < high"),
        (["lr=normal:0:1"], "unknown kind 'normal'"),
        (["alpha=uniform:0:2"], "alpha: must lie in"),
        (["epochs=int:1:2.5"], "integer ends"),
        (["distill.loss=choice:kl,bogus"], "distill.loss"),
        (["out_dir=choice:a,b"], "set by the search itself"),
        (["lr=uniform:x:1"], "not a number"),
        (["alpha"], "not of the form key=kind"),
        (["lr=choice:"], "at least one value"),
        (["lr=uniform:0.1:0.2", "lr=uniform:0.1:0.3"], "given twice"),
    ]:
        with pytest.raises(TuneError, match=msg):
            parse_space(space, base)
    with pytest.raises(TuneError, match="not found"):
        parse_space(tmp_path / "missing.yaml")
    assert [p.spec() for p in parse_space({"distill": {"beta": [0.1, 0.5]}, "lr": "loguniform:1e-4:1e-3",
                                            "lr_milestones": "choice:[[8, 9], [5]]"})] == [
        "distill.beta=choice:[0.1, 0.5]", "lr=loguniform:0.0001:0.001", "lr_milestones=choice:[[8, 9], [5]]"]
    assert main(["tune", *BASE, "--space", "alpah=uniform:0:1", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean alpha" in capsys.readouterr().err
    assert main(["tune", *BASE, "--space", "lr=0.1", "--out", str(tmp_path / "x")]) == 2  # an override, no space
    assert "empty search space" in capsys.readouterr().err
    assert main(["tune", "--space", "lr=uniform:0.1:0.2", "missing.yaml", "--out", str(tmp_path / "x")]) == 2
    assert "config file not found: missing.yaml" in capsys.readouterr().err  # a config after --space is the config
    with pytest.raises(SystemExit, match="one config file"):
        main(["tune", "a.yaml", "b.yaml", "--space", "lr=uniform:0.1:0.2", "--out", str(tmp_path / "x")])
    with pytest.raises(TuneError, match="empty search space"):
        tune(None, [], overrides=BASE, out=tmp_path / "x")
    assert not (tmp_path / "x" / "study.db").exists()


def test_pareto_front_and_export():
    assert sorted(pareto_front([[90, 10], [80, 20], [85, 5], [80, 20], [70, 15]])) == [0, 1, 3]
    import certdist.tune as module  # the module is callable too, so certdist.tune(...) works either way
    assert callable(certdist.tune) and callable(module)


CHILD = """
import sys, time
from pathlib import Path
import certdist.tune as T
import certdist.training.loop as L
T.HEARTBEAT_S, T.GRACE_S = 1, 2
real = L.train

def stalled(cfg, resume=False, overwrite=False, on_epoch=None):
    def hook(row):
        on_epoch(row)
        if int(row["epoch"]) == 1:  # the first epoch's checkpoint is saved: wait to be killed
            Path(sys.argv[2]).write_text("1")
            time.sleep(600)
    return real(cfg, resume=resume, overwrite=overwrite, on_epoch=hook)

L.train = stalled
T.tune(None, {space!r}, trials=1, out=sys.argv[1], overrides={base!r}, validation={val}, prune=False, report=False,
       verbose=False)
"""


def test_killed_trial_is_retried_from_its_checkpoint(tmp_path, monkeypatch):
    """A trial whose process is killed (SIGKILL: no Python cleanup) stays RUNNING; once its heartbeat is stale
    the next search marks it FAIL and reruns it with the same values, resuming its folder's checkpoint."""
    import subprocess
    import sys
    import time

    import certdist.tune as T
    out, marker = tmp_path / "k", tmp_path / "epoch1"
    base = [b for b in BASE if not b.startswith("epochs=")] + ["epochs=3"]
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(space=SPACE, base=base, val=VAL))
    child = subprocess.Popen([sys.executable, str(script), str(out), str(marker)])
    try:
        for _ in range(600):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.2)
        assert marker.exists(), f"the child search ended (rc {child.poll()}) before its first epoch"
    finally:
        child.kill()
        child.wait()
    killed = study_of(out).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING
    folder = out / "trials" / "tune_trial0000" / "seed0"
    assert (folder / "last.pt").exists() and not (folder / "results.json").exists()

    monkeypatch.setattr(T, "HEARTBEAT_S", 1)
    monkeypatch.setattr(T, "GRACE_S", 2)
    time.sleep(3)  # the killed trial's heartbeat goes stale
    res = tune(None, SPACE, trials=1, out=out, overrides=base, validation=VAL, prune=False, report=False,
               verbose=False)
    states = [t.state for t in res.study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL and states[1] == optuna.trial.TrialState.COMPLETE
    retry = res.study.trials[1]
    assert retry.params == killed.params and retry.user_attrs["resumed_from"] == 0
    assert retry.user_attrs["run_dir"] == str(folder)
    assert not (out / "trials" / "tune_trial0001").exists()
    epochs = [int(r["epoch"]) for r in csv.DictReader((folder / "metrics.csv").open())]
    assert epochs == [1, 2, 3]  # epoch 1 from the killed process, 2-3 resumed; none trained twice
    assert json.loads((folder / "results.json").read_text())["split"] == "validation"
