"""certdist.load_onnx: ONNX graphs in the usual exporters' forms -> an nn.Sequential equal to onnxruntime."""
from __future__ import annotations

import gzip
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import certdist  # noqa: E402
from certdist.interop.onnx_import import OnnxImportError, load_onnx, onnx_session, run_session  # noqa: E402
from certdist.models import Normalize  # noqa: E402

SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, Normalize)


def torch_export(model: nn.Module, shape, path) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(shape), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"])


def save_graph(nodes, inits, in_shape, out_shape, path, opset=13) -> None:
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f"
                                                else np.int64), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def assert_equal_to_ort(model: nn.Module, path, n: int = 16, seed: int = 1) -> None:
    info = model.onnx_input
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal((n, info.size)).astype(np.float32)
    ref = run_session(onnx_session(path), flat.reshape(n, *info.shape[1:]))
    with torch.no_grad():
        out = model(info.to_model(torch.from_numpy(flat))).numpy().reshape(n, -1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, SUPPORTED) for m in model), [type(m).__name__ for m in model]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_pytorch_mlp_with_normalisation(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(Normalize([0.1307], [0.3081]), nn.Flatten(), nn.Linear(36, 20), nn.ReLU(),
                        nn.Dropout(0.2), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    torch_export(net, (1, 1, 6, 6), tmp_path / "mlp.onnx")
    model = certdist.load_onnx(tmp_path / "mlp.onnx")
    assert_equal_to_ort(model, tmp_path / "mlp.onnx")
    assert isinstance(model[0], Normalize) and float(model[0].std.flatten()[0]) == pytest.approx(0.3081)
    assert sum(isinstance(m, Normalize) for m in model) == 1  # Sub then Div: one layer


def test_pytorch_conv_net_with_normalisation_batchnorm_avgpool(tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 5, 2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    for bn in (net[2], net[9]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    torch_export(net, (1, 3, 8, 8), tmp_path / "conv.onnx")
    model = load_onnx(tmp_path / "conv.onnx")
    assert_equal_to_ort(model, tmp_path / "conv.onnx")
    with torch.no_grad():
        x = torch.rand(5, 3, 8, 8)
        torch.testing.assert_close(model(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_view_flatten_and_gzip(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))
    torch.manual_seed(2)
    torch_export(Net(), (1, 1, 4, 4), tmp_path / "view.onnx")
    (tmp_path / "view.onnx.gz").write_bytes(gzip.compress((tmp_path / "view.onnx").read_bytes()))
    model = load_onnx(tmp_path / "view.onnx.gz")
    assert_equal_to_ort(model, tmp_path / "view.onnx")


def test_matmul_add_chain_flat_input_with_mul_normalisation(tmp_path):
    """tf2onnx / ACAS Xu style: [1, 1, 1, 5] input, Sub / Mul normalisation, MatMul + Add, no Gemm."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"], name="norm_sub"),
             helper.make_node("Mul", ["a", "scale"], ["b"], name="norm_mul"),
             helper.make_node("MatMul", ["b", "W1"], ["c"], name="mm1"),
             helper.make_node("Add", ["c", "b1"], ["d"], name="add1"),
             helper.make_node("Relu", ["d"], ["e"], name="relu1"),
             helper.make_node("MatMul", ["e", "W2"], ["f"], name="mm2"),
             helper.make_node("Add", ["b2", "f"], ["y"], name="add2")]
    inits = {"mean": rng.standard_normal(5), "scale": rng.random(5) + 0.5, "W1": rng.standard_normal((5, 7)),
             "b1": rng.standard_normal(7), "W2": rng.standard_normal((7, 3)), "b2": rng.standard_normal(3)}
    save_graph(nodes, inits, [1, 1, 1, 5], [1, 1, 1, 3], tmp_path / "acas.onnx")
    model = load_onnx(tmp_path / "acas.onnx")
    assert_equal_to_ort(model, tmp_path / "acas.onnx")
    assert model.onnx_input.model_shape == (5, 1, 1)


def test_pad_then_conv_folded(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="constant"),
             helper.make_node("Conv", ["p", "w", "cb"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc", transB=1, alpha=1.0)]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "w": rng.standard_normal((3, 2, 3, 3)),
             "cb": rng.standard_normal(3), "W": rng.standard_normal((4, 3 * 3 * 3)), "b": rng.standard_normal(4)}
    save_graph(nodes, inits, [1, 2, 5, 5], [1, 4], tmp_path / "pad.onnx")
    model = load_onnx(tmp_path / "pad.onnx")
    assert_equal_to_ort(model, tmp_path / "pad.onnx")
    conv = next(m for m in model if isinstance(m, nn.Conv2d))
    assert conv.padding == (1, 1)


def test_nhwc_input_transpose_and_transposed_flatten(tmp_path):
    """A TF-style graph: NHWC input, Transpose to NCHW, conv, Transpose back to NHWC before Flatten."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Div", ["t", "std"], ["n"], name="div"),
             helper.make_node("Conv", ["n", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "cb"], ["cc"], name="conv_bias"),
             helper.make_node("Relu", ["cc"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["rt"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["rt", "shape"], ["f"], name="reshape"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="fc")]
    inits = {"std": np.array([0.5, 2.0]).reshape(1, 2, 1, 1), "w": rng.standard_normal((3, 2, 3, 3)),
             "cb": rng.standard_normal((1, 3, 1, 1)), "shape": np.array([1, -1]),
             "W": rng.standard_normal((4 * 4 * 3, 5))}
    save_graph(nodes, inits, [1, 4, 4, 2], [1, 5], tmp_path / "nhwc.onnx")
    model = load_onnx(tmp_path / "nhwc.onnx")
    assert_equal_to_ort(model, tmp_path / "nhwc.onnx")
    info = model.onnx_input
    assert info.shape == (1, 4, 4, 2) and info.model_shape == (2, 4, 4)
    x = np.arange(32, dtype=np.float32).reshape(1, 4, 4, 2)  # round trip of the layout
    np.testing.assert_array_equal(info.to_onnx(info.to_model(x.reshape(1, -1))), x)


def _refused(nodes, inits, path, in_shape=(1, 1, 4, 4), out_shape=(1, 3)):
    save_graph(nodes, inits, list(in_shape), list(out_shape), path)
    with pytest.raises(OnnxImportError) as e:
        load_onnx(path)
    return str(e.value)


def test_maxpool_refused_naming_the_node(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv0"),
             helper.make_node("MaxPool", ["c"], ["m"], name="pool_7", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["m"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="fc", transB=1)]
    msg = _refused(nodes, {"w": rng.standard_normal((2, 1, 3, 3)), "W": rng.standard_normal((3, 2))},
                   tmp_path / "maxpool.onnx")
    assert "MaxPool" in msg and "pool_7" in msg


def test_sigmoid_refused(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["g"], name="fc", transB=1),
             helper.make_node("Sigmoid", ["g"], ["y"], name="act_sig")]
    msg = _refused(nodes, {"W": np.ones((3, 16))}, tmp_path / "sig.onnx")
    assert "Sigmoid" in msg and "act_sig" in msg


def test_residual_add_refused_before_any_work(tmp_path):
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1"], ["a"], name="fc1", transB=1),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["b"], name="fc2", transB=1),
             helper.make_node("Add", ["b", "a"], ["s"], name="residual_add"),
             helper.make_node("Gemm", ["s", "W3"], ["y"], name="fc3", transB=1)]
    msg = _refused(nodes, {"W1": rng.standard_normal((6, 16)), "W2": rng.standard_normal((6, 6)),
                           "W3": rng.standard_normal((3, 6))}, tmp_path / "res.onnx")
    assert "residual_add" in msg and "Add" in msg


def test_pytorch_residual_refused(tmp_path):
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)
    torch_export(Res(), (1, 4), tmp_path / "res.onnx")
    with pytest.raises(OnnxImportError, match="Add"):
        load_onnx(tmp_path / "res.onnx")


def test_asymmetric_pad_refused(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad_asym"),
             helper.make_node("Conv", ["p", "w"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="fc", transB=1)]
    msg = _refused(nodes, {"pads": np.array([0, 0, 0, 0, 0, 0, 1, 1]), "w": np.ones((1, 1, 2, 2)),
                           "W": np.ones((3, 16))}, tmp_path / "pad.onnx")
    assert "asymmetric" in msg and "conv" in msg
