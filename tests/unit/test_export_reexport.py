"""Exporting a benchmark again into the same folder replaces the earlier export's files, and only those."""
from __future__ import annotations

import csv

from certdist.interop import export_benchmark
from conftest import random_net, self_labelled_points


def listing(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_reexport_removes_the_stale_files_of_the_earlier_export(tmp_path):
    net = random_net("mlp", 1).eval()
    X, Y = self_labelled_points(net, 8)
    export_benchmark(net, X, Y, 0.05, tmp_path, limit=6, name="old")
    assert len([f for f in listing(tmp_path) if f.endswith(".vnnlib")]) == 6
    unrelated = {"README.md": "notes", "vnnlib/mine.vnnlib": "(mine)", "vnnlib/prop_notes.txt": "x",
                 "onnx/other.onnx": "not ours", "instances_old.csv": "a,b,1"}
    for rel, text in unrelated.items():
        (tmp_path / rel).write_text(text)

    csv_path = export_benchmark(net, X, Y, 0.1, tmp_path, limit=2)  # fewer points, another eps and name
    rows = list(csv.reader(csv_path.open()))
    new = {"onnx/model.onnx", "vnnlib/prop_0_eps_0.1.vnnlib", "vnnlib/prop_1_eps_0.1.vnnlib"}
    assert {r[0] for r in rows} | {r[1] for r in rows} == new
    assert listing(tmp_path) == new | {"instances.csv"} | set(unrelated)  # no stale property, others kept
    for rel, text in unrelated.items():
        assert (tmp_path / rel).read_text() == text

    export_benchmark(net, X, Y, 0.1, tmp_path, limit=3)  # more points again: all rewritten
    assert len([f for f in listing(tmp_path) if f.startswith("vnnlib/prop_") and f.endswith(".vnnlib")]) == 3


def test_reexport_never_follows_paths_outside_the_folder(tmp_path):
    net = random_net("mlp", 1).eval()
    X, Y = self_labelled_points(net, 3)
    out = tmp_path / "bench"
    out.mkdir()
    (tmp_path / "precious.vnnlib").write_text("keep")
    (out / "instances.csv").write_text("../precious.vnnlib,onnx/../../precious.vnnlib,1\n")
    export_benchmark(net, X, Y, 0.05, out, limit=1)
    assert (tmp_path / "precious.vnnlib").read_text() == "keep"
