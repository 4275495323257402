"""A tiny numpy evaluator of ONNX graphs, in float64 (the ops the exporter writes, and a few more): the
reference that :func:`certdist.interop.onnx_export.check_onnx` and :func:`certdist.interop.load_onnx`
compare torch with. One function per ONNX op in ``_OPS``."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

def _windows(x: np.ndarray, k: list[int], s: list[int], pads: list[int], d: list[int] | None = None) -> np.ndarray:
    """Sliding windows [N, C, OH, OW, kh, kw] of a zero-padded NCHW array."""
    d = d or [1, 1]
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ek = [(k[i] - 1) * d[i] + 1 for i in range(2)]
    w = np.lib.stride_tricks.sliding_window_view(x, ek, axis=(2, 3))
    return w[:, :, ::s[0], ::s[1], ::d[0], ::d[1]]


def _conv(x, w, b=None, kernel_shape=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, **_):
    if group != 1:
        raise NotImplementedError("numpy ONNX evaluator: grouped convolutions are not supported")
    win = _windows(x, list(w.shape[2:]), list(strides), list(pads), list(dilations))
    out = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    return out if b is None else out + b.reshape(1, -1, 1, 1)


def _avgpool(x, kernel_shape=None, strides=None, pads=(0, 0, 0, 0), count_include_pad=0, **_):
    k = list(kernel_shape)
    s = list(strides or k)
    win = _windows(x, k, s, list(pads))
    total = win.sum(axis=(-1, -2))
    if count_include_pad or not any(pads):
        return total / (k[0] * k[1])
    ones = _windows(np.ones_like(x[:1, :1]), k, s, list(pads)).sum(axis=(-1, -2))
    return total / ones


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
    a = a.T if transA else a
    b = b.T if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


def _batchnorm(x, scale, bias, mean, var, epsilon=1e-5, **_):
    shape = [1, -1] + [1] * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) + bias.reshape(shape)


def _flatten(x, axis=1, **_):
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(x, shape, **_):
    shape = [x.shape[i] if v == 0 else int(v) for i, v in enumerate(shape)]
    return x.reshape(shape)


_OPS = {
    "Gemm": _gemm, "MatMul": lambda a, b, **_: a @ b, "Add": lambda a, b, **_: a + b,
    "Sub": lambda a, b, **_: a - b, "Mul": lambda a, b, **_: a * b, "Div": lambda a, b, **_: a / b,
    "Relu": lambda x, **_: np.maximum(x, 0), "Flatten": _flatten, "Reshape": _reshape, "Conv": _conv,
    "BatchNormalization": _batchnorm, "AveragePool": _avgpool, "Identity": lambda x, **_: x,
}


def run_onnx(model: Any, x: np.ndarray) -> np.ndarray:
    """Evaluate an ONNX model (a path or a ``ModelProto``) with one input and one output, in float64."""
    import onnx
    from onnx import helper, numpy_helper
    proto = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    g = proto.graph
    env = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    inputs = [i.name for i in g.input if i.name not in env]
    env[inputs[0]] = np.asarray(x, dtype=np.float64)
    for node in g.node:
        if node.op_type not in _OPS:
            raise NotImplementedError(f"numpy ONNX evaluator: op {node.op_type} is not supported; "
                                      f"supported: {', '.join(sorted(_OPS))}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args = [env[n] for n in node.input if n]
        env[node.output[0]] = _OPS[node.op_type](*args, **attrs)
    return env[g.output[0].name]
