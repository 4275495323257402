"""`certdist table` / `plot`: one row per distinct setting, unambiguous seed and point counts, the run folder's
certification (certify_*.jsonl) and AutoAttack results, and plot titles with the real numbers of points."""
from __future__ import annotations

import json

import pytest

from certdist.reporting import collect, format_table, plot_figure


def make_run(root, name, seed, n=200, clean=80.0, extra_cfg=None, data=None, metrics=True):
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "method": "ibp", "eps": 0.1, "lr": 0.001, "progress": False,
           "out_dir": str(root), "num_threads": seed, "distill": {"teacher": None, "beta": 0.1}, "eval": {"limit": None}}
    if data is not None:
        cfg["data"] = data
    cfg |= extra_cfg or {}
    res = {"n": n, "eps": 0.1, "clean_acc": clean + seed, "robust_acc": 50.0, "ibp_cert_acc": 30.0, "attack": "pgd",
           "attack_settings": {"steps": 10}, "dataset": "synthetic", "arch": "mlp", "method": "ibp", "seed": seed,
           "config": cfg, "train_time_s": 1.0}
    (d / "results.json").write_text(json.dumps(res))
    if metrics:
        (d / "metrics.csv").write_text("epoch,lr,eps,time_s,train_loss,test_clean,test_ibp_cert\n"
                                       "1,0.001,0.05,1,2.0,50,20\n2,0.001,0.1,1,1.5,60,30\n")
    return d


def certify_file(path, statuses, eps=0.1, start=0):
    with path.open("w") as f:
        for i, st in enumerate(statuses):
            stage = {"verified": "crown", "misclassified": "clean", "falsified": "attack", "unknown": "bab"}[st]
            f.write(json.dumps({"index": start + i, "status": st, "stage": stage, "time_s": 0.1, "eps": eps}) + "\n")


def body(table: str) -> list[list[str]]:
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_runs_of_other_settings_are_not_counted_as_seeds(tmp_path):
    make_run(tmp_path, "sw", 0)
    make_run(tmp_path, "sw", 1)  # differs in the seed and runtime / location keys only
    make_run(tmp_path, "sw", 2, extra_cfg={"lr": 0.01})  # another setting under the same name
    table = format_table(collect([tmp_path]))
    assert "mixed" not in table
    rows = body(table)
    assert len(rows) == 2, table
    by_run = {r["run"]: r for r in rows}
    assert by_run["sw (lr=0.001)"]["seeds"] == "2" and by_run["sw (lr=0.01)"]["seeds"] == "1"
    assert by_run["sw (lr=0.001)"]["points"] == "200" and by_run["sw (lr=0.001)"]["clean %"] == "80.50 ± 0.71"
    # distillation settings without a teacher change nothing: same row
    make_run(tmp_path, "sw", 3, extra_cfg={"distill": {"teacher": None, "beta": 0.5}})
    assert body(format_table(collect([tmp_path])))[0]["seeds"] == "3"


def test_one_evaluation_shows_its_points_not_n_equals_one(tmp_path):
    ev = {"n": 200, "eps": 0.1, "clean_acc": 90.0, "robust_acc": 70.0, "ibp_cert_acc": 50.0, "attack": "pgd",
          "attack_settings": {"steps": 40}, "dataset": "synthetic", "arch": "mlp", "method": "ibp"}
    table = format_table([ev], group=False)
    row = body(table)[0]
    assert row["points"] == "200" and row["seed"] == "-" and "n" not in row and "seeds" not in row


def test_table_includes_the_pipeline_certification_and_autoattack(tmp_path):
    d0 = make_run(tmp_path, "r", 0)
    d1 = make_run(tmp_path, "r", 1)
    # seed 0: certified in two shards (4 points: 2 verified, 1 unknown); a certification at another eps is ignored
    certify_file(d0 / "certify_eps0.1_shard0of2.jsonl", ["verified", "unknown"], start=0)
    certify_file(d0 / "certify_eps0.1_shard1of2.jsonl", ["verified", "falsified"], start=1000)
    certify_file(d0 / "certify_eps0.2.jsonl", ["unknown"] * 9, eps=0.2)
    certify_file(d1 / "certify_test4.jsonl", ["verified", "verified", "verified", "misclassified"])
    (d0 / "eval_eps0.1_autoattack.json").write_text(json.dumps(
        {"n": 100, "eps": 0.1, "clean_acc": 80.0, "robust_acc": 44.0, "ibp_cert_acc": 30.0, "attack": "autoattack"}))
    (d0 / "eval_eps0.2_autoattack.json").write_text(json.dumps(
        {"n": 100, "eps": 0.2, "clean_acc": 80.0, "robust_acc": 1.0, "ibp_cert_acc": 0.0, "attack": "autoattack"}))
    rows = collect([tmp_path])
    p0 = next(r for r in rows if r["seed"] == 0)["pipeline"]
    assert p0 == {"certified_acc": 50.0, "clean_acc": 100.0, "attack_acc": 75.0, "n": 4, "unknown": 1,
                  "file": "certify_eps0.1.jsonl"}
    row = body(format_table(rows))[0]
    assert row["verified %"] == "62.50 ± 17.68" and row["verified pts"] == "4" and row["unknown"] == "1/0"
    assert row["AutoAttack %"] == "44.00 (1 of 2 seeds)" and row["AA pts"] == "100"
    per_run = body(format_table(rows, group=False))
    assert [r["verified %"] for r in per_run] == ["50.00", "75.00"]
    assert [r["AutoAttack %"] for r in per_run] == ["44.00", "-"]


def test_plot_titles_state_the_real_points_and_the_trade_off_prefers_the_pipeline(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    d0 = make_run(tmp_path, "a", 0, data={"dataset": "synthetic", "test_limit": 300})
    make_run(tmp_path, "b", 0, data={"dataset": "synthetic", "test_limit": 300})
    certify_file(d0 / "certify_eps0.1.jsonl", ["verified", "misclassified", "falsified", "verified"])
    fig = plot_figure([tmp_path])
    axes = fig.axes
    assert "first 300 points" in axes[0].get_title() and "1000" not in axes[0].get_title()
    assert "pipeline-verified" in axes[3].get_title() and "IBP-certified" in axes[3].get_title()
    notes = sorted(t.get_text() for t in axes[3].texts)
    assert notes == ["a/seed0 (pipeline, 4 pts)", "b/seed0 (IBP, 200 pts)"]
    point = axes[3].collections[0].get_offsets()[0]
    assert tuple(point) == (50.0, 75.0)  # the pipeline's certified and clean accuracy on the same points
    plt.close(fig)
    # fit() runs (no dataset in the config): the count of their final evaluation of the whole split
    fit_root = tmp_path / "fit"
    make_run(fit_root, "f", 0, n=500)
    fig = plot_figure([fit_root])
    assert "first 500 points" in fig.axes[0].get_title()
    assert fig.axes[3].get_title() == "trade-off: clean vs IBP-certified % (final)"
    plt.close(fig)
