"""certdist verify: ONNX + general VNN-LIB properties -> sat / unsat, counterexamples confirmed by
onnxruntime, gzipped files, the instances.csv runner and the command line."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import certdist  # noqa: E402
from certdist.cli import main  # noqa: E402
from certdist.interop.onnx_import import onnx_session, run_session  # noqa: E402
from certdist.interop import parse_vnnlib  # noqa: E402
from certdist.verification.vnnlib_verify import verify_instances, verify_vnnlib  # noqa: E402


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    certdist.export_onnx(_net(), path, (2,))
    return path


@pytest.fixture(scope="module")
def grid_outputs(model_file):
    """onnxruntime's float32 outputs on a 201 x 201 grid of the box [0, 1]^2 (an exhaustive-ish check)."""
    t = np.linspace(0, 1, 201, dtype=np.float32)
    xs = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    return xs, run_session(onnx_session(model_file), xs)  # the file has a fixed batch of 1


def _prop(assertions: str, lo=(0.0, 0.0), hi=(1.0, 1.0)) -> str:
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(2))
    head += "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    box = "".join(f"(assert (>= X_{i} {lo[i]}))\n(assert (<= X_{i} {hi[i]}))\n" for i in range(2))
    return head + box + assertions + "\n"


def _num(v: float) -> str:
    return np.format_float_positional(float(v), trim="0")


def _confirm(model_file, res, text: str) -> None:
    """The counterexample: inside the box and inside one disjunct, by onnxruntime on the file."""
    prop = parse_vnnlib(text)
    x, y = res.counterexample
    assert x.dtype == np.float32 and ((x >= prop.lower) & (x <= prop.upper)).all()
    y_ort = run_session(onnx_session(model_file), x.reshape(1, 2))[0]
    np.testing.assert_array_equal(y_ort, y)
    assert prop.unsafe(y_ort.astype(np.float64))
    lines = res.format().splitlines()
    assert lines[0] == "sat" and lines[1].startswith("((X_0 ") and lines[-1].endswith("))")


@pytest.fixture(scope="module")
def margin_range(grid_outputs):
    _, ys = grid_outputs
    d = ys[:, 0].astype(np.float64) - ys[:, 1]
    return float(d.min()), float(d.max())


def test_provably_unsat(model_file, grid_outputs, margin_range):
    lo, _ = margin_range
    text = _prop(f"(assert (<= (- Y_0 Y_1) {_num(lo - 0.02)}))")
    res = verify_vnnlib(model_file, text, timeout=30)
    assert res.result == "unsat", res
    _, ys = grid_outputs  # the property really holds on the grid
    prop = parse_vnnlib(text)
    assert not any(prop.unsafe(y.astype(np.float64)) for y in ys[::5])
    assert (ys[:, 0].astype(np.float64) - ys[:, 1] > lo - 0.02).all()


def test_known_violation_is_sat_with_confirmed_counterexample(model_file, margin_range):
    _, hi = margin_range
    text = _prop(f"(assert (>= (- Y_0 Y_1) {_num(hi - 0.01)}))")
    res = verify_vnnlib(model_file, text, timeout=30)
    assert res.result == "sat", res
    _confirm(model_file, res, text)


def test_multi_disjunct_targeted(model_file, grid_outputs, margin_range):
    """Three disjuncts: two are infeasible (one of them by a conjunction), one holds at some inputs."""
    lo, hi = margin_range
    _, ys = grid_outputs
    y2max = float(ys[:, 2].max())
    unsat_part = (f"(and (<= Y_0 {_num(-1e3)}))\n"  # far below anything reached
                  f"(and (>= Y_2 {_num(y2max + 0.5)}) (>= Y_1 0.0))")
    sat_text = _prop(f"(assert (or\n{unsat_part}\n(and (>= (- Y_0 Y_1) {_num(hi - 0.01)}) (<= Y_2 100.0))\n))")
    res = verify_vnnlib(model_file, sat_text, timeout=30)
    assert res.result == "sat", res
    _confirm(model_file, res, sat_text)
    # the same infeasible disjuncts with an infeasible third one: unsat
    unsat_text = _prop(f"(assert (or\n{unsat_part}\n(and (<= (- Y_0 Y_1) {_num(lo - 0.02)}))\n))")
    res = verify_vnnlib(model_file, unsat_text, timeout=30)
    assert res.result == "unsat", res


def test_conv_net_with_normalisation_robustness(tmp_path):
    """A PyTorch-exported conv net and certdist's own robustness property file (9 disjuncts)."""
    torch.manual_seed(3)
    net = nn.Sequential(certdist.Normalize([0.5], [0.25]), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(27, 10))
    x = torch.rand(1, 1, 6, 6)
    y = int(net(x).argmax())
    net_file = certdist.export_onnx(net, tmp_path / "conv.onnx", (1, 6, 6))
    from certdist.interop import export_vnnlib
    small = export_vnnlib(x[0], y, 1e-4, 10, tmp_path / "small.vnnlib")
    assert verify_vnnlib(net_file, small, timeout=30).result == "unsat"
    big = export_vnnlib(x[0], y, 0.5, 10, tmp_path / "big.vnnlib")
    res = verify_vnnlib(net_file, big, timeout=30)
    assert res.result == "sat"
    _check = parse_vnnlib(big)
    cx, cy = res.counterexample
    assert _check.unsafe(run_session(onnx_session(net_file), cx.reshape(1, 1, 6, 6))[0].astype(np.float64))


def _benchmark(tmp_path: Path, model_file: Path, margin_range) -> Path:
    lo, hi = margin_range
    root = tmp_path / "bench"
    (root / "onnx").mkdir(parents=True)
    (root / "vnnlib").mkdir()
    (root / "onnx" / "net.onnx.gz").write_bytes(gzip.compress(model_file.read_bytes()))
    props = {"unsat": f"(assert (<= (- Y_0 Y_1) {_num(lo - 0.02)}))",
             "sat": f"(assert (>= (- Y_0 Y_1) {_num(hi - 0.01)}))"}
    for name, a in props.items():
        (root / "vnnlib" / f"{name}.vnnlib.gz").write_bytes(gzip.compress(_prop(a).encode()))
    # the csv names the files without .gz (as VNN-COMP's do); they are found gzipped
    (root / "instances.csv").write_text("onnx/net.onnx,vnnlib/unsat.vnnlib,30\n"
                                        "onnx/net.onnx.gz,vnnlib/sat.vnnlib.gz,30\n")
    return root


def test_instances_runner_with_gzipped_files(tmp_path, model_file, margin_range):
    root = _benchmark(tmp_path, model_file, margin_range)
    out = tmp_path / "results.csv"
    summary = verify_instances(root / "instances.csv", out=out, progress=False)
    assert [r["result"] for r in summary["rows"]] == ["unsat", "sat"]
    assert summary["counts"]["unsat"] == 1 and summary["counts"]["sat"] == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["result"] for r in rows] == ["unsat", "sat"] and all(float(r["time_s"]) >= 0 for r in rows)


def test_cli_verify_single_and_instances(tmp_path, model_file, margin_range, capsys):
    root = _benchmark(tmp_path, model_file, margin_range)
    out = tmp_path / "result.txt"
    assert main(["verify", str(root / "onnx" / "net.onnx.gz"), str(root / "vnnlib" / "sat.vnnlib.gz"),
                 "--timeout", "30", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("sat\n((X_0 ") and "(Y_2 " in text
    assert capsys.readouterr().out.startswith("sat\n")
    assert main(["verify", "--instances", str(root / "instances.csv"), "--out", str(tmp_path / "r.csv")]) == 0
    printed = capsys.readouterr().out
    assert "instances: 2" in printed and "unsat" in printed and "total time" in printed
    assert (tmp_path / "r.csv").read_text().count("\n") == 3


def test_refused_network_is_an_error_row(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save
    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="sig")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    save(m, str(tmp_path / "sig.onnx"))
    (tmp_path / "p.vnnlib").write_text(_prop("(assert (<= Y_0 0.0))"))
    (tmp_path / "instances.csv").write_text("sig.onnx,p.vnnlib,5\n")
    summary = verify_instances(tmp_path / "instances.csv", progress=False)
    assert summary["rows"][0]["result"] == "error" and "Sigmoid" in summary["rows"][0]["message"]
    del numpy_helper


def test_bab_shares_the_time_left_among_the_disjuncts_not_yet_tried(monkeypatch):
    """Each open disjunct's chain BaB gets the time left divided by the disjuncts not yet tried; the
    ones tried and still open no longer count. With all D budgets spent the whole time is used (dividing
    by all open disjuncts left (1 - 1/D)^D of it unused: 35% at D = 9, seen as 'unknown' ~3.5 s before
    a 15 s timeout on every hard VNN-COMP mnistfc instance)."""
    from types import SimpleNamespace

    from certdist.verification import chain_bab
    from certdist.verification import vnnlib_verify as vv
    clock = [9.0]  # seconds left
    budgets = []

    def fake_chain_bab(net, x, _, C, budget, check, **kwargs):
        budgets.append(budget)
        clock[0] -= budget  # runs to its budget without a verdict
        return SimpleNamespace(status="unknown", counterexample=None)
    monkeypatch.setattr(chain_bab, "chain_bab_verify", fake_chain_bab)
    D = 9
    inst = SimpleNamespace(left=lambda: clock[0], open=[True] * D, info=SimpleNamespace(model_shape=(2,)),
                           network=SimpleNamespace(net=None), x64=None, box64=None, cfg=vv.VerifyConfig(),
                           confirm=lambda x, d: None)
    gap = {d: (d, -float(d), 0.0, torch.zeros(3)) for d in range(D)}
    assert vv._bab(inst, gap, None, vv.VerifyResult("unknown", "", 0.0)) is None
    assert budgets == pytest.approx([1.0] * D)
    assert clock[0] == pytest.approx(0.0)
