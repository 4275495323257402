"""ONNX export (:func:`export_onnx`): the eval-mode network, normalisation included, built node by node from
its layers (no tracing, no onnxscript), one rule per layer type (:data:`ONNX_RULES`), checked with
``onnx.checker`` and against torch's outputs with the numpy evaluator of the graph
(:func:`certdist.interop.onnx_numpy.run_onnx`), and with onnxruntime as well when it is installed.
VNN-LIB properties: :mod:`certdist.interop.vnnlib`; a VNN-COMP benchmark folder:
:mod:`certdist.interop.benchmark`.

Inputs are flattened in C order (channel, row, column), as ONNX verifiers read ``X_i``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from certdist.interop.onnx_numpy import run_onnx
from certdist.models.cnn import flat_layers
from certdist.models.layers import Normalize
from certdist.models.support import LayerRules, check_supported
from certdist.propagation.ibp import check_fixed_batchnorm

OPSET = 13


# ---------------------------------------------------------------------------------------------------
# ONNX export.

class _Graph:
    """Collects nodes and initialisers; each ``add`` consumes the current tensor and produces a new one."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.current = "input"
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper
        full = f"{name}_{self.count}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), full))
        return full

    def add(self, op: str, *extra_inputs: str, **attrs: Any) -> None:
        from onnx import helper
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, [self.current, *extra_inputs], [out], name=f"{op}_{self.count}", **attrs))
        self.current = out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _hw_list(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


# One rule per layer type of the layer-support contract (:data:`certdist.models.support.SUPPORTED_LAYERS`,
# exact types; :func:`export_onnx` checks the contract first): ``rule(graph, layer, rank)`` adds the layer's
# nodes for an input of ``rank`` dimensions (batch included).
OnnxRule = Callable[[_Graph, nn.Module, int], None]
ONNX_RULES = LayerRules("onnx")  # exact layer type -> OnnxRule
register = ONNX_RULES.register


@register(Normalize)
def _normalize(g: _Graph, m: Normalize, rank: int) -> None:
    g.add("Sub", g.const("mean", _np(m.mean)))
    g.add("Div", g.const("std", _np(m.std)))


@register(nn.Conv2d)
def _conv(g: _Graph, m: nn.Conv2d, rank: int) -> None:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError(f"cannot export {m}: only numeric zero padding")
    p = _hw_list(m.padding)
    bias = [g.const("conv_b", _np(m.bias))] if m.bias is not None else []
    g.add("Conv", g.const("conv_w", _np(m.weight)), *bias, kernel_shape=list(m.kernel_size),
          strides=_hw_list(m.stride), pads=[p[0], p[1], p[0], p[1]], dilations=_hw_list(m.dilation), group=m.groups)


@register(nn.Linear)
def _linear(g: _Graph, m: nn.Linear, rank: int) -> None:
    if rank != 2:  # on the last dimension of [N, ..., in] (Gemm is 2-D only)
        g.add("MatMul", g.const("fc_wt", _np(m.weight).T))
        if m.bias is not None:
            g.add("Add", g.const("fc_b", _np(m.bias)))
        return
    b = _np(m.bias) if m.bias is not None else np.zeros(m.out_features)
    g.add("Gemm", g.const("fc_w", _np(m.weight)), g.const("fc_b", b), transB=1)


@register(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(g: _Graph, m: nn.modules.batchnorm._BatchNorm, rank: int) -> None:
    w = _np(m.weight) if m.weight is not None else np.ones(m.num_features)
    b = _np(m.bias) if m.bias is not None else np.zeros(m.num_features)
    g.add("BatchNormalization", g.const("bn_scale", w), g.const("bn_bias", b),
          g.const("bn_mean", _np(m.running_mean)), g.const("bn_var", _np(m.running_var)), epsilon=float(m.eps))


@register(nn.ReLU)
def _relu(g: _Graph, m: nn.ReLU, rank: int) -> None:
    g.add("Relu")


@register(nn.Flatten)
def _flatten(g: _Graph, m: nn.Flatten, rank: int) -> None:
    if m.start_dim != 1 or m.end_dim != -1:
        raise TypeError(f"cannot export {m}: only Flatten(1, -1)")
    g.add("Flatten", axis=1)


@register(nn.AvgPool2d)
def _avgpool(g: _Graph, m: nn.AvgPool2d, rank: int) -> None:
    if m.ceil_mode or m.divisor_override is not None:
        raise TypeError(f"cannot export {m}: ceil_mode / divisor_override")
    k, p = _hw_list(m.kernel_size), _hw_list(m.padding)
    g.add("AveragePool", kernel_shape=k, strides=_hw_list(m.stride if m.stride is not None else m.kernel_size),
          pads=[p[0], p[1], p[0], p[1]], count_include_pad=int(m.count_include_pad))


def _emit(g: _Graph, m: nn.Module, rank: int = 2) -> None:
    """The nodes of layer ``m`` on an input of ``rank`` dimensions (batch included)."""
    rule = ONNX_RULES.get(type(m))
    if rule is None:
        raise TypeError(f"cannot export layer {type(m).__name__} to ONNX")
    rule(g, m, rank)


def _full_shape(input_shape: Sequence[int]) -> list[int]:
    shape = list(input_shape)
    return shape if len(shape) == 4 else [1, *shape]


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], check: bool = True,
                atol: float = 1e-4, seed: int = 0) -> Path:
    """Write the eval-mode ``model`` (a copy; the caller's mode is untouched) to ``path`` (opset 13).

    ``input_shape``: ``(C, H, W)`` (batch 1) or ``(B, C, H, W)``. With ``check`` the file is reloaded,
    passed through ``onnx.checker`` and its outputs on random inputs in [0, 1] compared with torch's
    (``atol``) by :func:`run_onnx`, and by onnxruntime when installed; a mismatch raises ValueError."""
    import onnx
    from onnx import TensorProto, helper
    if OPSET > onnx.defs.onnx_opset_version():
        raise RuntimeError(f"installed onnx supports opset {onnx.defs.onnx_opset_version()} < {OPSET}")
    shape = _full_shape(input_shape)
    check_supported(model, shape[1:])  # the layer-support contract, before any copy or file
    net = copy.deepcopy(model).eval()
    g = _Graph()
    a = torch.zeros(shape)
    for m in flat_layers(net):
        check_fixed_batchnorm(m)
        _emit(g, m, a.dim())
        with torch.no_grad():
            a = m(a)
    with torch.no_grad():
        out_shape = list(net(torch.zeros(shape)).shape)
    graph = helper.make_graph(g.nodes, "certdist", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(g.current, TensorProto.FLOAT, out_shape)], g.inits)
    proto = helper.make_model(graph, producer_name="certdist", opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = min(proto.ir_version, 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    if check:
        check_onnx(net, path, shape, atol, seed)
    return path


def check_onnx(model: nn.Module, path: str | os.PathLike, shape: Sequence[int], atol: float = 1e-4,
               seed: int = 0) -> float:
    """Reload ``path``, run the checker and compare with the eval-mode ``model``; returns the max error."""
    import onnx
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(list(shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x).numpy()
    outs = {"numpy evaluator": run_onnx(proto, x.numpy())}
    try:
        import onnxruntime as ort
    except ImportError:
        pass
    else:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs["onnxruntime"] = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = 0.0
    for who, out in outs.items():
        e = float(np.abs(out - ref).max())
        if not e <= atol:
            raise ValueError(f"{path}: ONNX outputs ({who}) differ from torch by {e:.3g} > {atol}")
        err = max(err, e)
    return err
