"""ONNX and VNN-LIB export: parsed back, checked, and compared with torch."""
from __future__ import annotations

import csv
import re

import numpy as np
import onnx
import pytest
import torch

from certdist.interop import (VnnlibProperty, export_benchmark, export_onnx, export_vnnlib, parse_vnnlib,
                              run_onnx)
from conftest import random_net, self_labelled_points


@pytest.mark.parametrize("kind,bn_train", [("mlp", False), ("conv", False), ("conv_bn", True)])
def test_onnx_roundtrip_matches_torch_eval_mode(tmp_path, kind, bn_train):
    net = random_net(kind, 0, bn_train=bn_train)
    spec = net.input_spec
    path = export_onnx(net, tmp_path / "m.onnx", (spec.channels, spec.size, spec.size))
    assert net.training == bn_train  # the caller's mode is untouched
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(1, spec.channels, spec.size, spec.size)
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    assert np.abs(run_onnx(proto, x.numpy()) - ref).max() < 1e-4
    ops = {n.op_type for n in proto.graph.node}
    assert {"Sub", "Div", "Gemm", "Relu"} <= ops  # normalisation is inside the exported graph
    if kind == "conv_bn":
        assert "BatchNormalization" in ops and "Conv" in ops


def test_vnnlib_roundtrip(tmp_path):
    x = torch.tensor([[[0.05, 0.5], [0.97, 0.3]]])
    export_vnnlib(x, 2, 0.1, 4, tmp_path / "p.vnnlib")
    prop = parse_vnnlib(tmp_path / "p.vnnlib")
    flat = x.flatten().double().numpy()
    assert np.allclose(prop.lower, np.clip(flat - 0.1, 0, 1), atol=1e-7)
    assert np.allclose(prop.upper, np.clip(flat + 0.1, 0, 1), atol=1e-7)
    assert prop.lower[0] == 0.0 and prop.upper[2] == 1.0  # clipped to [0, 1]
    assert len(prop.disjuncts) == 3 and prop.num_outputs == 4
    assert prop.unsafe(np.array([0.0, 5.0, 1.0, 0.0])) and not prop.unsafe(np.array([0.0, 1.0, 5.0, 2.0]))
    assert prop.unsafe(np.array([0.0, 0.0, 1.0, 1.0]))  # a tie counts as unsafe
    text = (tmp_path / "p.vnnlib").read_text()
    assert "(declare-const X_3 Real)" in text and "(and (>= Y_0 Y_2))" in text and not re.search(r"\d[eE][-+]?\d", text)


ACAS_STYLE = """
; ACAS Xu / mnist_fc style property
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)

; input constraints
(assert (<= X_0 0.6))
(assert (>= X_0 0.5))
(assert (<= X_1 0.25))
(assert (>= X_1 -0.25))

(assert (or
    (and (>= Y_0 Y_1))
    (and (>= Y_0 Y_2) (<= Y_1 3.5))
))
(assert (<= (+ Y_0 (* 2 Y_2)) 10))
"""


def test_parse_vnncomp_style_example():
    prop = parse_vnnlib(ACAS_STYLE)
    assert isinstance(prop, VnnlibProperty)
    assert np.allclose(prop.lower, [0.5, -0.25]) and np.allclose(prop.upper, [0.6, 0.25])
    assert len(prop.disjuncts) == 2
    A, b = prop.disjuncts[1]
    assert A.shape == (3, 3)  # Y_1 - Y_0 <= 0, Y_1 <= 3.5, Y_0 + 2 Y_2 <= 10
    assert prop.unsafe(np.array([2.0, 1.0, 0.0]))
    assert not prop.unsafe(np.array([0.0, 1.0, 0.5]))
    assert not prop.unsafe(np.array([9.0, 1.0, 2.0]))  # violates the conjoined sum constraint
    with pytest.raises(ValueError):
        parse_vnnlib("(declare-const X_0 Real)(assert (or (<= X_0 1) (>= X_0 2)))")


def test_export_benchmark_layout(tmp_path):
    net = random_net("mlp", 1).eval()
    spec = net.input_spec
    X, Y = self_labelled_points(net, 5)
    Y[0] = (Y[0] + 1) % spec.num_classes  # one misclassified point, skipped
    csv_path = export_benchmark(net, X, Y, 0.05, tmp_path, limit=4, timeout=60)
    rows = list(csv.reader(csv_path.open()))
    assert len(rows) == 3 and all(r[0] == "onnx/model.onnx" and r[2] == "60" for r in rows)
    for r in rows:
        prop = parse_vnnlib(tmp_path / r[1])
        i = int(r[1].split("_")[1])
        flat = X[i].flatten().double().numpy()
        assert np.allclose(prop.lower, np.clip(flat - 0.05, 0, 1), atol=1e-7)
        out = run_onnx(tmp_path / r[0], X[i:i + 1].numpy())[0]
        assert not prop.unsafe(out)  # correctly classified at the centre
