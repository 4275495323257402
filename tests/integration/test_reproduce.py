"""`certdist reproduce`: a tiny table end to end on synthetic data (teacher, students, certification,
results files), then resumed without retraining."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from certdist import reproduce as R
from certdist.cli import main
from certdist.verification.certify import CertifyConfig, read_records
from conftest import write_tiny_teacher_and_student

@pytest.mark.slow
def test_reproduce_table_end_to_end(tmp_path, monkeypatch, capsys):
    write_tiny_teacher_and_student(tmp_path, 400)
    monkeypatch.chdir(tmp_path)
    teacher = R.Method("PGD-AT teacher", "teacher.yaml")
    table = R.Table("synthetic-0.05/mlp", "synthetic", 0.05, teacher,
                    (R.Method("CC-IBP", "student.yaml"),
                     R.Method("CC-Dist", "student.yaml", ("name=s_dist", "distill.loss=box", "distill.features=standardized"),
                              True)),
                    seeds=(0,), certify_n=6, validation=300, note="tiny",
                    certify=CertifyConfig(timeout=5.0, attack_steps=10, restarts=1, max_domains=20))
    monkeypatch.setitem(R.TABLES, "tiny", table)
    assert main(["reproduce", "tiny", "--out-dir", "runs", "--results", "res"]) == 0
    rows = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("PGD-AT teacher", 0), ("CC-IBP", 0), ("CC-Dist", 0)]
    keys = {"setting", "method", "teacher", "seed", "clean", "pgd", "ibp_cert", "certified", "n"}
    recs = read_records(next((tmp_path / "runs").rglob("certify_test6.jsonl")))
    assert recs and all(r["settings"]["max_domains"] == 20 for r in recs)  # the table's effort budget
    for r in rows:
        assert keys <= set(r) and r["n"] == 6 and r["split"] == "test"
        assert 0 <= r["ibp_cert"] <= r["pgd"] <= r["clean"] <= 100
        assert (r["teacher"] == "PGD-AT teacher") == (r["method"] == "CC-Dist")
        if r["method"] != "PGD-AT teacher":
            assert r["ibp_cert"] <= r["certified"] <= r["pgd"]
    cfg = json.loads((tmp_path / "runs" / "s_dist" / "seed0" / "results.json").read_text())["config"]
    assert cfg["data"]["validation"] == 300 and cfg["eval"]["split"] == "validation"
    assert cfg["distill"]["teacher"] == "runs/t/seed0/last.pt"
    md = (tmp_path / "res" / "tiny.md").read_text()
    assert "| synthetic-0.05/mlp | CC-Dist | PGD-AT teacher | 1 | 6 |" in md
    assert (tmp_path / "res" / "tiny.png").stat().st_size > 1000
    # resumed: nothing is retrained, the certification files are reused
    mtime = (tmp_path / "runs" / "s" / "seed0" / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "tiny", "--out-dir", "runs", "--results", "res"]) == 0
    assert "finished, skipped" in capsys.readouterr().out
    assert (tmp_path / "runs" / "s" / "seed0" / "last.pt").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "res" / "tiny.json").read_text()) == rows
    # --collect starts nothing and labels a table with missing runs as partial
    (tmp_path / "runs" / "s_dist" / "seed0" / "results.json").unlink()
    assert main(["reproduce", "tiny", "--out-dir", "runs", "--results", "res", "--collect"]) == 0
    assert not (tmp_path / "runs" / "s_dist" / "seed0" / "results.json").exists()
    assert len(json.loads((tmp_path / "res" / "tiny.json").read_text())) == 2
    assert "PARTIAL: 2 of 3 rows" in (tmp_path / "res" / "tiny.md").read_text()

    # the two students in two worker processes: the numbers of the single-process run above
    assert main(["reproduce", "tiny", "--out-dir", "runs2", "--results", "res2", "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("table runs done") == 2
    two = json.loads((tmp_path / "res2" / "tiny.json").read_text())
    drop = ("run", "train_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in two] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_reproduce_lists_tables_and_rejects_unknown(capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "mnist-0.1:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        main(["reproduce", "nope"])


def test_markdown_mean_and_sample_std():
    row = dict(setting="s", teacher=None, n=10, split="test", certified=None, train_time_s=1.0)
    rows = [dict(row, method="A", seed=i, clean=c, pgd=c - 1, ibp_cert=c - 2) for i, c in enumerate((90.0, 92.0, 94.0))]
    md = R.format_markdown(rows)
    assert "| s | A | - | 3 | 10 | 92.00 ± 2.00 | 91.00 ± 2.00 | 90.00 ± 2.00 | - |" in md


def test_markdown_marks_metrics_with_fewer_seeds():
    row = dict(setting="s", teacher=None, n=10, split="test", train_time_s=1.0, clean=90.0, pgd=89.0, ibp_cert=80.0)
    rows = [dict(row, method="A", seed=0, certified=85.0), dict(row, method="A", seed=1, certified=None)]
    assert "| s | A | - | 2 | 10 | 90.00 ± 0.00 | 89.00 ± 0.00 | 80.00 ± 0.00 | 85.00 (1 seed) |" in R.format_markdown(rows)


def test_shipped_tables_never_share_a_run_folder_between_settings(monkeypatch):
    """Tables share ``--out-dir``: two runs with the same folder must be the very same run (a grid table
    reuses its final table's seed-0 runs), never e.g. an eps 0.1 and an eps 0.2 student."""
    from certdist.config import load_config, to_dict
    from certdist.sweep import run_dir
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the configs/ of the repository
    seen: dict = {}
    for name, t in R.TABLES.items():
        assert t.dataset in t.setting and f"-{t.eps:g}/" in t.setting, name
        for m in (t.teacher, *t.methods):
            ov = R._overrides(t, "runs/x", m, "runs/x/teacher.pt" if m.distill else None)
            cfg = load_config(m.config, ov)
            assert cfg.eps == t.eps and cfg.data.dataset == t.dataset, (name, m.label)
            for s in t.seeds:
                d = run_dir(m.config, s, ov)
                cfg_s = to_dict(load_config(m.config, ov + [f"seed={s}"]))
                cfg_s.pop("distill")  # the teacher path differs per table in this test only
                assert seen.setdefault(d, cfg_s) == cfg_s, f"{name}/{m.label}: {d} is also another run"
