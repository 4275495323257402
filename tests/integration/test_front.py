"""`certdist reproduce <front>`: a tiny CC-IBP vs CC-Dist front end to end on synthetic data (teacher, two
alphas, both methods, certification, results files), resumed without retraining; and the hypervolume."""
from __future__ import annotations

import json

import pytest

from certdist import front as F
from certdist.cli import main
from certdist.verification.certify import CertifyConfig, read_records
from conftest import write_tiny_teacher_and_student

def test_hypervolume_on_hand_made_points():
    assert F.hypervolume([]) == 0.0
    assert F.hypervolume([(80.0, 50.0)]) == pytest.approx(4000.0)
    two = [(80.0, 50.0), (60.0, 70.0)]  # 80 x 50 + 60 x (70 - 50)
    assert F.hypervolume(two) == pytest.approx(5200.0)
    assert F.hypervolume(two + [(70.0, 40.0), (60.0, 70.0), (80.0, 50.0)]) == pytest.approx(5200.0)  # dominated, repeated
    assert F.hypervolume(list(reversed(two))) == pytest.approx(5200.0)
    assert F.hypervolume(two, ref=(50.0, 40.0)) == pytest.approx(30 * 10 + 10 * 20)
    assert F.hypervolume(two + [(45.0, 90.0)], ref=(50.0, 40.0)) == pytest.approx(500.0)  # not above the reference
    assert F.non_dominated([(80, 50), (60, 70), (70, 40)]) == [0, 1]


def test_hypervolumes_are_paired_by_seed():
    rows = [dict(method=m, alpha=a, seed=s, clean=c, certified=y, ibp_cert=y - 5.0)
            for s in (0, 1) for m, d in (("CC-IBP", 0.0), ("CC-Dist", 1.0))
            for a, c, y in ((0.1, 80.0, 50.0 + d + s), (0.3, 60.0, 70.0))]
    hv = F.hypervolumes(rows, [(0.0, 0.0)])
    pipe = next(h for h in hv if h["metric"] == "certified")
    assert pipe["seeds"] == [0, 1]
    assert pipe["per_seed"]["CC-IBP"] == [5200.0, 5220.0]
    assert pipe["per_seed"]["difference"] == [20.0, 20.0]
    assert pipe["mean_std"]["difference"] == [20.0, 0.0]
    nadir = next(h for h in F.hypervolumes(rows, [(0.0, 0.0), "nadir"]) if h["reference"] == "nadir")
    assert nadir["nadir"][:2] == [[60.0, 50.0], [60.0, 51.0]]  # per seed, both methods' componentwise minimum
    assert nadir["per_seed"]["CC-IBP"][0] == 0.0 and nadir["per_seed"]["CC-Dist"][0] == 20.0  # 20 x (51 - 50)


@pytest.mark.slow
def test_front_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    write_tiny_teacher_and_student(tmp_path, 300)
    monkeypatch.chdir(tmp_path)
    front = F.Front("synthetic-0.05/mlp", "synthetic", 0.05, "teacher.yaml", "student.yaml", alphas=(0.1, 0.5),
                    distill=("distill.loss=kl", "distill.level=logits", "distill.temperature=4", "distill.beta=0.1"),
                    seeds=(0,), train=("num_threads=1",), certify_n=5, eval_n=8, validation=200,
                    certify=CertifyConfig(timeout=5.0, attack_steps=10, restarts=1, max_domains=20),
                    references=((0.0, 0.0), "nadir"), note="tiny")
    monkeypatch.setitem(F.FRONTS, "tiny-front", front)
    assert main(["reproduce", "--list"]) == 0
    assert "tiny-front: tiny" in capsys.readouterr().out
    # the four student runs in two worker processes (spawned; the same numbers as in one, checked below)
    assert main(["reproduce", "tiny-front", "--out-dir", "runs", "--results", "res", "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("front runs done") == 4
    rec = json.loads((tmp_path / "res" / "tiny-front.json").read_text())
    got = [(r["method"], r["alpha"], r["seed"]) for r in rec["rows"]]
    assert got == [("PGD-AT teacher", None, 0), ("CC-IBP", 0.1, 0), ("CC-Dist", 0.1, 0), ("CC-IBP", 0.5, 0),
                   ("CC-Dist", 0.5, 0)]
    for r in rec["rows"][1:]:
        assert r["n"] == 8 and r["certified_n"] == 5 and r["split"] == "test" and r["val_split"] == "validation"
        assert 0 <= r["ibp_cert"] <= r["clean"] <= 100 and 0 <= r["certified"] <= r["pipeline_clean"] <= 100
    assert (tmp_path / "runs" / "tiny-front_cc-ibp_a0.1" / "seed0" / "eval_test8.json").exists()
    cfg = json.loads((tmp_path / "runs" / "tiny-front_cc-dist_a0.5" / "seed0" / "results.json").read_text())["config"]
    assert cfg["alpha"] == 0.5 and cfg["distill"]["beta"] == 0.1 and cfg["distill"]["loss"] == "kl"
    assert cfg["distill"]["teacher"] == "runs/tiny-front_teacher/seed0/last.pt"
    assert cfg["data"]["validation"] == 200 and cfg["eval"]["split"] == "validation"
    ibp_cfg = json.loads((tmp_path / "runs" / "tiny-front_cc-ibp_a0.1" / "seed0" / "results.json").read_text())["config"]
    assert ibp_cfg["alpha"] == 0.1 and not ibp_cfg["distill"]["teacher"]
    recs = read_records(tmp_path / "runs" / "tiny-front_cc-dist_a0.1" / "seed0" / "certify_test5.jsonl")
    assert len(recs) == 5 and all(r["settings"]["max_domains"] == 20 for r in recs)  # the front's effort budget
    assert len(rec["hypervolume"]) == 4 and all(h["seeds"] == [0] for h in rec["hypervolume"])
    for h in rec["hypervolume"]:
        for m in F.METHODS:
            pts = [(r["clean"], r[h["metric"]]) for r in rec["rows"] if r["method"] == m]
            ref = tuple(h["nadir"][0]) if h["reference"] == "nadir" else tuple(h["reference"])
            assert h["per_seed"][m] == [round(F.hypervolume(pts, ref), 2)]
    md = (tmp_path / "res" / "tiny-front.md").read_text()
    assert "| CC-Dist | 0.5 | 1 |" in md and "hypervolume" in md and "PARTIAL" not in md
    assert (tmp_path / "res" / "tiny-front.png").stat().st_size > 1000
    # resumed: nothing retrained, the certifications reused, the same numbers
    mtime = (tmp_path / "runs" / "tiny-front_cc-ibp_a0.5" / "seed0" / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "tiny-front", "--out-dir", "runs", "--results", "res"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 5
    assert (tmp_path / "runs" / "tiny-front_cc-ibp_a0.5" / "seed0" / "last.pt").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "res" / "tiny-front.json").read_text()) == rec
    # --collect starts nothing and labels a front with missing runs as partial
    (tmp_path / "runs" / "tiny-front_cc-dist_a0.5" / "seed0" / "results.json").unlink()
    assert main(["reproduce", "tiny-front", "--out-dir", "runs", "--results", "res", "--collect"]) == 0
    assert not (tmp_path / "runs" / "tiny-front_cc-dist_a0.5" / "seed0" / "results.json").exists()
    part = json.loads((tmp_path / "res" / "tiny-front.json").read_text())
    assert len(part["rows"]) == 4 and "PARTIAL: 3 of 4" in part["note"]
    assert all(h["alphas"] == [0.1] for h in part["hypervolume"])  # compared over the alphas both methods have

    # one process from scratch gives the numbers of the two worker processes above
    assert main(["reproduce", "tiny-front", "--out-dir", "runs1", "--results", "res1"]) == 0
    one = json.loads((tmp_path / "res1" / "tiny-front.json").read_text())
    drop = ("run", "train_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in one["rows"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rec["rows"]]
    assert one["hypervolume"] == rec["hypervolume"]


def test_shipped_fronts_are_consistent():
    from pathlib import Path

    from certdist.config import load_config
    root = Path(__file__).resolve().parents[2]
    for name, f in F.FRONTS.items():
        assert f.dataset in f.setting and f"-{f.eps:g}/" in f.setting, name
        for method, alpha in [(None, None)] + [(m, a) for m in F.METHODS for a in f.alphas]:
            cfg = load_config(str(root / (f.teacher if method is None else f.student)),
                              F._overrides(f, name, "runs/x", method, alpha, "runs/x/t.pt"))
            assert cfg.eps == f.eps and cfg.data.dataset == f.dataset and cfg.data.validation == f.validation
            for ov in (f.teacher_train if method is None else f.student_train):  # the own overrides arrive
                key, value = ov.split("=", 1)
                assert str(getattr(cfg, key)) == str(float(value) if "." in value or "e" in value else int(value)), (name, ov)
            if method is not None:
                assert cfg.alpha == alpha and bool(cfg.distill.teacher) == (method == "CC-Dist")
