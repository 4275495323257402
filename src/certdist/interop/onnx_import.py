"""Read an ONNX network as a float32 ``nn.Sequential`` of the layers the verifier supports.

:func:`load_onnx` converts the graph forms the usual exporters write (PyTorch, tf2onnx, the VNN-COMP
benchmarks) into ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``, ``BatchNorm1d/2d``, ``AvgPool2d`` and
certdist's ``Normalize``:

==========================================  ===================================================
ONNX                                        layer
==========================================  ===================================================
``Gemm``; ``MatMul`` (+ ``Add``)            ``Linear`` (the ``Add`` becomes its bias)
``Pad`` (zeros) + ``Conv``                  ``Conv2d`` (the padding folded in; symmetric only)
``Relu``                                    ``ReLU``
``Flatten``, ``Reshape`` to flat            ``Flatten`` (or nothing: already flat)
``Sub`` / ``Div`` by constants              ``Normalize`` (``Sub`` then ``Div``: one layer)
``Add`` by a constant                       the previous layer's bias, else ``Normalize``
``Mul`` by a constant                       a diagonal 1x1 ``Conv2d`` / a diagonal ``Linear``
``BatchNormalization``                      ``BatchNorm1d/2d`` (eval mode, running statistics)
``AveragePool``                             ``AvgPool2d``
``Identity``, ``Dropout``                   nothing
``Transpose`` / ``Reshape`` of the input    the input layout (e.g. NHWC -> NCHW), see below
``Transpose`` before ``Flatten`` + ``Gemm``  a permutation of the ``Linear``'s columns
==========================================  ===================================================

Every conversion keeps the network's *exact* function (the weights are the file's float32 values; no
folding that rounds), so the verifier's float32 rounding bound applies to the graph as written.
Constant sub-graphs (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape`` of ``x.view(x.size(0), -1)``)
are folded with numpy. Anything else (``MaxPool``, ``Sigmoid``, a branch, a residual ``Add``, ...) is
refused by :class:`OnnxImportError` *before* any conversion, naming the op and the node.

Input layout: VNN-LIB's ``X_i`` index the ONNX input flattened in C order. When the graph starts with
a ``Transpose`` (an NHWC input) or a ``Reshape``, the returned model takes the input after those ops;
``model.onnx_input`` (:class:`OnnxInput`) maps flat ONNX inputs to model inputs and back.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certdist.models.layers import Normalize

# ops that compute on the network's tensor (each takes it as its only non-constant input)
LAYER_OPS = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv", "Pad", "Relu", "Flatten", "Reshape",
             "BatchNormalization", "AveragePool", "Identity", "Dropout", "Transpose")
# ops folded with numpy when all their inputs are constants (or shapes of the network's tensor)
CONSTANT_OPS = ("Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Identity",
                "Add", "Sub", "Mul", "Div", "Neg", "Slice", "Transpose", "Flatten", "ReduceProd")


class OnnxImportError(ValueError):
    """The ONNX graph uses an op, a form or a branch the verifier does not support."""


@dataclass(frozen=True)
class OnnxInput:
    """How the model's input relates to the ONNX file's: ``name`` and ``shape`` (batch 1) of the ONNX
    input, ``model_shape`` of the model's input (no batch dimension), and ``index``: the model's flat
    input is ``onnx_flat[index]`` (None: the same order)."""

    name: str
    shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    index: np.ndarray | None

    @property
    def size(self) -> int:
        return int(np.prod(self.model_shape))

    def to_model(self, flat: Any) -> Any:
        """``[N, n]`` flat ONNX inputs (numpy or torch) -> ``[N, *model_shape]`` model inputs."""
        if self.index is not None:
            flat = flat[:, self.index] if isinstance(flat, np.ndarray) else flat[:, torch.as_tensor(self.index)]
        return flat.reshape(flat.shape[0], *self.model_shape)

    def to_onnx(self, x: Any) -> Any:
        """``[N, *model_shape]`` model inputs -> ``[N, *shape[1:]]`` ONNX inputs (the file's layout)."""
        flat = x.reshape(x.shape[0], -1)
        if self.index is not None:
            inv = np.argsort(self.index)
            flat = flat[:, inv] if isinstance(flat, np.ndarray) else flat[:, torch.as_tensor(inv)]
        return flat.reshape(flat.shape[0], *self.shape[1:])


def onnx_input_of(model: nn.Module) -> OnnxInput:
    """The :class:`OnnxInput` of a model returned by :func:`load_onnx`."""
    info = getattr(model, "onnx_input", None)
    if not isinstance(info, OnnxInput):
        raise ValueError("the model was not read by certdist.load_onnx (it has no onnx_input)")
    return info


def read_maybe_gz(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, gunzipped when it ends in ``.gz`` (VNN-COMP ships ``.onnx.gz``/``.vnnlib.gz``)."""
    data = Path(path).read_bytes()
    return gzip.decompress(data) if str(path).endswith(".gz") else data


def _node_name(node, k: int) -> str:
    return f"{node.op_type} node {node.name or '#' + str(k)!r}"


def _attrs(node) -> dict[str, Any]:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# ---------------------------------------------------------------------------------------------------
# The up-front check: ops, a single chain, no branches.

def _check_graph(graph, consts: set[str]) -> str:
    """Refuse unsupported ops and non-chain graphs before any conversion; returns the input's name."""
    inputs = [i.name for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise OnnxImportError(f"the graph must have exactly one input, got {len(inputs)}: {inputs}")
    if len(graph.output) != 1:
        raise OnnxImportError(f"the graph must have exactly one output, got {len(graph.output)}")
    dynamic = {inputs[0]}
    uses: dict[str, list[str]] = {}
    for k, node in enumerate(graph.node):
        where = _node_name(node, k)
        dyn_in = [n for n in node.input if n in dynamic]
        if node.op_type == "Shape" or not dyn_in:  # folded to constants
            if node.op_type not in CONSTANT_OPS:
                raise OnnxImportError(f"unsupported op {node.op_type} ({where}) on constants; foldable ops: "
                                      f"{', '.join(CONSTANT_OPS)}")
            continue
        if node.op_type not in LAYER_OPS:
            raise OnnxImportError(f"unsupported op {node.op_type} ({where}); the verifier supports: "
                                  f"{', '.join(LAYER_OPS)}")
        if len(set(dyn_in)) > 1 or list(node.input).count(dyn_in[0]) > 1:
            raise OnnxImportError(f"{where} combines computed tensors {sorted(set(dyn_in))} (a branch or "
                                  "residual connection); only chains of layers are supported")
        uses.setdefault(dyn_in[0], []).append(where)
        outs = [o for o in node.output if o]
        if node.op_type == "Dropout":
            outs = outs[:1]
        dynamic.update(outs)
    for name, users in uses.items():
        if len(users) > 1:
            raise OnnxImportError(f"tensor {name!r} feeds several nodes ({', '.join(users)}): a branch; only "
                                  "chains of layers are supported")
    out = graph.output[0].name
    if out not in dynamic:
        raise OnnxImportError(f"the output {out!r} does not depend on the input")
    return inputs[0]


# ---------------------------------------------------------------------------------------------------
# Constant folding (numpy).

def _fold(node, args: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    from onnx import numpy_helper
    op = node.op_type
    if op == "Constant":
        if "value" in attrs:
            return numpy_helper.to_array(attrs["value"])
        for key in ("value_float", "value_int"):
            if key in attrs:
                return np.array(attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in attrs:
                return np.array(list(attrs[key]))
        raise OnnxImportError(f"unsupported Constant form {sorted(attrs)}")
    if op in ("Identity", "Cast"):
        if op == "Cast":
            from onnx import helper
            return args[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        return args[0]
    if op == "Gather":
        return np.take(args[0], args[1].astype(np.int64), axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        axes = list(attrs["axes"]) if "axes" in attrs else [int(a) for a in args[1]]
        out = args[0]
        rank = out.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = list(attrs["axes"]) if "axes" in attrs else ([int(a) for a in args[1]] if len(args) > 1 else None)
        return np.squeeze(args[0], axis=None if axes is None else tuple(axes))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attrs.get("axis", 0))
    if op == "Reshape":
        shape = [args[0].shape[i] if v == 0 else int(v) for i, v in enumerate(args[1])]
        return args[0].reshape(shape)
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        return args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
    if op == "Transpose":
        return np.transpose(args[0], attrs.get("perm"))
    if op == "Neg":
        return -args[0]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = args
        if op == "Div" and np.issubdtype(a.dtype, np.integer):
            return a // b
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
    if op == "ReduceProd":
        return np.prod(args[0], keepdims=bool(attrs.get("keepdims", 1)))
    if op == "Slice":
        if "starts" in attrs:
            starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
        else:
            starts, ends = args[1], args[2]
            axes = args[3] if len(args) > 3 else None
            steps = args[4] if len(args) > 4 else None
        axes = list(range(len(starts))) if axes is None else list(axes)
        steps = [1] * len(starts) if steps is None else list(steps)
        sl = [slice(None)] * args[0].ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            sl[int(a)] = slice(int(s), int(e), int(st))
        return args[0][tuple(sl)]
    raise OnnxImportError(f"cannot fold {op}")  # pragma: no cover - _check_graph refuses it first


# ---------------------------------------------------------------------------------------------------
# The converter.

def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _exact_f32(a: np.ndarray) -> bool:
    a = np.asarray(a, dtype=np.float64)
    return bool(np.all(a.astype(np.float32).astype(np.float64) == a))


class _Builder:
    """Walks the chain, emitting layers; tracks the model's tensor (``z``, zeros of its shape) and, while a
    Transpose/Reshape is pending, ``view``: the ONNX tensor as indices into the model tensor's flat order."""

    def __init__(self, input_name: str, input_shape: tuple[int, ...]) -> None:
        self.input_name, self.onnx_shape = input_name, input_shape
        self.layers: list[nn.Module] = []
        self.z = torch.zeros(input_shape)
        self.view: np.ndarray | None = None
        self.input_index: np.ndarray | None = None
        self.model_shape: tuple[int, ...] = tuple(input_shape[1:])
        self.pad: list[int] | None = None
        self.where = ""
        self.fresh_bias = False  # the last layer is a Linear/Conv2d whose bias is still all zeros
        self.flat_image = False  # a flat ONNX tensor held as [1, n, 1, 1] (input normalisation on a flat input)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The ONNX-semantic shape of the current tensor."""
        if self.view is not None:
            return tuple(self.view.shape)
        return (1, self.z.numel()) if self.flat_image else tuple(self.z.shape)

    def _index(self) -> np.ndarray:
        return self.view if self.view is not None else np.arange(self.z.numel()).reshape(self.shape)

    def relayout(self, new: np.ndarray) -> None:
        same = new.shape == tuple(self.z.shape) or (self.flat_image and new.ndim == 2)
        self.view = None if (same and np.array_equal(new.ravel(), np.arange(new.size))) else new

    def settle(self) -> None:
        """Before a layer: a pending layout is absorbed into the input (no layer yet) or refused."""
        if self.view is None:
            return
        if self.layers:
            raise OnnxImportError(f"{self.where}: a Transpose/Reshape in the middle of the network is supported "
                                  "only before Flatten + Gemm/MatMul")
        idx = self.view.reshape(self.view.shape[0], -1)[0]
        base = self.input_index if self.input_index is not None else np.arange(idx.size)
        self.input_index = base[idx]
        if np.array_equal(self.input_index, np.arange(idx.size)):
            self.input_index = None
        self.model_shape = tuple(self.view.shape[1:])
        self.z = torch.zeros((1, *self.model_shape))
        self.view = None

    def add(self, layer: nn.Module, fresh_bias: bool = False) -> None:
        self.settle()
        self.pending_pad_check()
        with torch.no_grad():
            self.z = layer.eval()(self.z)
        self.layers.append(layer)
        self.fresh_bias = fresh_bias
        if isinstance(layer, nn.Flatten):
            self.flat_image = False

    def pending_pad_check(self) -> None:
        if self.pad is not None:
            raise OnnxImportError(f"{self.where}: a Pad must be followed directly by the Conv it pads")

    # -- layers --------------------------------------------------------------------------------------
    def flat(self) -> int:
        """Make the tensor flat [1, n] (a Flatten layer when needed); returns n."""
        shape = self.shape
        if shape[0] != 1 or any(d != 1 for d in shape[1:-1]):
            raise OnnxImportError(f"{self.where}: a matrix product needs a flat input [1, n], got shape {shape}")
        if self.view is None and self.z.dim() > 2:
            if not self.layers:  # a flat ONNX input such as [1, 1, 1, 5]: the model takes [n]
                self.relayout(self._index().reshape(1, -1))
            else:
                self.add(nn.Flatten())
        return shape[-1]

    def linear(self, W: np.ndarray, b: np.ndarray | None) -> None:
        """``y = x W^T + b`` on the flat tensor; a pending Transpose permutes W's columns."""
        n = self.flat()
        if W.shape[1] != n:
            raise OnnxImportError(f"{self.where}: weight expects {W.shape[1]} inputs, the tensor has {n}")
        perm = None
        if self.view is not None and self.layers:
            perm = self.view.reshape(-1)
            self.view = None
            if self.z.dim() > 2:
                self.add(nn.Flatten())
        m = nn.Linear(W.shape[1], W.shape[0], bias=True)
        with torch.no_grad():
            w = np.empty_like(W)
            if perm is None:
                w[:] = W
            else:
                w[:, perm] = W
            m.weight.copy_(_f32(w))
            m.bias.copy_(_f32(np.zeros(W.shape[0]) if b is None else np.broadcast_to(b, (W.shape[0],))))
        self.add(m, fresh_bias=b is None or not np.any(b))

    def conv(self, w: np.ndarray, b: np.ndarray | None, a: dict[str, Any]) -> None:
        if self.pad is not None:
            pad, self.pad = self.pad, None
        else:
            pad = [0, 0, 0, 0]
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise OnnxImportError(f"{self.where}: auto_pad={a['auto_pad']} is not supported (explicit pads only)")
        if w.ndim != 4 or len(self.shape) != 4:
            raise OnnxImportError(f"{self.where}: only 2-d convolutions on [1, C, H, W] tensors are supported")
        pads = [p + q for p, q in zip(list(a.get("pads", [0, 0, 0, 0])), pad)]
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise OnnxImportError(f"{self.where}: asymmetric padding {pads} is not supported")
        group = int(a.get("group", 1))
        m = nn.Conv2d(w.shape[1] * group, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", [1, 1])),
                      padding=(pads[0], pads[1]), dilation=tuple(a.get("dilations", [1, 1])), groups=group, bias=True)
        with torch.no_grad():
            m.weight.copy_(_f32(w))
            m.bias.copy_(_f32(np.zeros(w.shape[0]) if b is None else b))
        self.add(m, fresh_bias=b is None or not np.any(b))

    def elementwise(self, op: str, c: np.ndarray, const_first: bool) -> None:
        """``x op c`` (or ``c op x``) with a constant ``c``, as an exact layer."""
        if const_first:
            if op == "Sub":  # c - x = -(x) + c
                self.elementwise("Mul", np.array(-1.0), False)
                self.elementwise("Add", c, False)
                return
            if op == "Div":
                raise OnnxImportError(f"{self.where}: a constant divided by the tensor is not linear")
        c = np.asarray(c, dtype=np.float64)
        if op == "Div" and not np.all(c > 0):
            raise OnnxImportError(f"{self.where}: division by non-positive constants is not supported")
        last = self.layers[-1] if self.layers else None
        shape = self.shape
        if not self.layers and len(shape) > 2 and all(d == 1 for d in shape[:-1]):  # e.g. [1, 1, 1, 5]: flat
            self.relayout(self._index().reshape(1, -1))
            shape = self.shape
        if op in ("Add", "Sub") and self.fresh_bias and self.view is None and self.pad is None:
            per = self._per_channel(c, shape, silent=True)
            if per is not None:  # the bias of the previous Linear/Conv2d (still zero: exact)
                with torch.no_grad():
                    last.bias.copy_(_f32(per if op == "Add" else -per))
                self.fresh_bias = False
                return
        per = self._per_channel(c, shape)
        image = len(shape) == 4
        if len(shape) == 2 and (self.flat_image or not self.layers):
            if not self.layers:  # a flat input: the model takes [n, 1, 1] (per-feature Normalize), Flatten follows
                self.relayout(self._index().reshape(1, -1, 1, 1))
                self.settle()
                self.flat_image = True
            image = True
        if image:
            if op in ("Sub", "Add"):
                self.add(Normalize((per if op == "Sub" else -per).tolist(), [1.0] * len(per)))
            elif op == "Div":
                if isinstance(last, Normalize) and bool((last.std == 1).all()) and self.view is None \
                        and self.pad is None:  # Sub then Div: Normalize's own (x - mean) / std
                    with torch.no_grad():
                        last.std.copy_(_f32(per).view(1, -1, 1, 1))
                else:
                    self.add(Normalize([0.0] * len(per), per.tolist()))
            else:  # Mul: a 1x1 convolution with a diagonal weight (exact: the other products are zeros)
                m = nn.Conv2d(len(per), len(per), 1, bias=True)
                with torch.no_grad():
                    m.weight.copy_(_f32(np.diag(per)).view(len(per), len(per), 1, 1))
                    m.bias.zero_()
                self.add(m, fresh_bias=True)
            return
        # a flat tensor in the middle of the network: a diagonal Linear
        n = shape[-1]
        if op == "Div":
            inv = 1.0 / per
            if not _exact_f32(inv) or not np.all(inv * per == 1.0):
                raise OnnxImportError(f"{self.where}: division of a flat tensor by constants whose inverses are "
                                      "not exact in float32 is not supported")
        W = np.diag(per if op == "Mul" else (1.0 / per if op == "Div" else np.ones(n)))
        b = None if op in ("Mul", "Div") else (per if op == "Add" else -per)
        self.linear(W, b)

    def _per_channel(self, c: np.ndarray, shape: tuple[int, ...], silent: bool = False) -> np.ndarray | None:
        """``c`` as one value per channel (axis 1) of ``shape`` (flat: per feature), or refuse."""
        if c.size == 1:
            return np.full(shape[1], float(c.reshape(-1)[0]))
        try:
            full = np.broadcast_to(c, (1, *shape[1:])) if c.ndim <= len(shape) else None
        except ValueError:
            full = None
        if full is None and len(shape) == 2 and c.size == shape[1] and all(d == 1 for d in c.shape[:-1]):
            full = c.reshape(1, -1)
        if full is not None:
            per = full.reshape(1, shape[1], -1)[0]
            if np.all(per == per[:, :1]):
                return per[:, 0].copy()
        if silent:
            return None
        raise OnnxImportError(f"{self.where}: constant of shape {c.shape} on a tensor of shape {shape}: only "
                              "scalars or one value per channel are supported")

    def reshape(self, target: list[int]) -> None:
        shape = self.shape
        n = int(np.prod(shape))
        tgt = [shape[i] if v == 0 and i < len(shape) else int(v) for i, v in enumerate(target)]
        if -1 in tgt:
            k = tgt.index(-1)
            rest = int(np.prod([v for i, v in enumerate(tgt) if i != k]))
            tgt[k] = n // rest
        if int(np.prod(tgt)) != n:
            raise OnnxImportError(f"{self.where}: cannot reshape {shape} to {target}")
        if tuple(tgt) == shape:
            return
        if self.view is not None or not self.layers:
            self.relayout(self._index().reshape(tgt))
            return
        if tgt == [1, n]:
            if len(shape) > 2:
                self.add(nn.Flatten())
            return
        raise OnnxImportError(f"{self.where}: reshaping {shape} to {tgt} in the middle of the network is not "
                              "supported (only to flat [1, n])")


def _gemm(b: _Builder, args: list, a: dict[str, Any]) -> None:
    if a.get("transA", 0):
        raise OnnxImportError(f"{b.where}: Gemm with transA=1 is not supported")
    B = args[1]
    W = B if a.get("transB", 0) else B.T  # [out, in]
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    C = args[2] if len(args) > 2 and args[2] is not None else None
    if alpha != 1.0:
        if not _exact_f32(alpha * W):
            raise OnnxImportError(f"{b.where}: Gemm alpha={alpha} does not scale the weights exactly in float32")
        W = alpha * W
    if C is not None:
        C = np.asarray(C, dtype=np.float64).reshape(-1)
        if beta != 1.0:
            if not _exact_f32(beta * C):
                raise OnnxImportError(f"{b.where}: Gemm beta={beta} does not scale the bias exactly in float32")
            C = beta * C
    b.linear(np.asarray(W, dtype=np.float64), C)


def _convert(b: _Builder, node, args: list, a: dict[str, Any]) -> None:
    op = node.op_type
    if op in ("Identity",):
        return
    if op == "Dropout":
        if len(args) > 2 and args[2] is not None and bool(np.asarray(args[2])):
            raise OnnxImportError(f"{b.where}: Dropout in training mode")
        return
    if op == "Relu":
        b.add(nn.ReLU())
    elif op == "Gemm":
        _gemm(b, args, a)
    elif op == "MatMul":
        if args[1] is None or args[1].ndim != 2:
            raise OnnxImportError(f"{b.where}: MatMul needs the tensor first and a constant 2-d matrix second")
        b.linear(np.asarray(args[1], dtype=np.float64).T, None)
    elif op in ("Add", "Sub", "Mul", "Div"):
        const_first = args[0] is not None
        c = args[0] if const_first else args[1]
        b.elementwise(op, c, const_first)
    elif op == "Conv":
        b.conv(args[1], args[2] if len(args) > 2 else None, a)
    elif op == "Pad":
        mode = a.get("mode", "constant")
        pads = list(a["pads"]) if "pads" in a else [int(v) for v in args[1]]
        value = a.get("value", 0.0) if "pads" in a else (float(np.asarray(args[2]).reshape(-1)[0])
                                                         if len(args) > 2 and args[2] is not None else 0.0)
        if len(args) > 3 and args[3] is not None:
            raise OnnxImportError(f"{b.where}: Pad with axes is not supported")
        if mode != "constant" or value != 0.0 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) \
                or min(pads) < 0:
            raise OnnxImportError(f"{b.where}: only zero padding of H and W before a Conv is supported "
                                  f"(mode={mode}, value={value}, pads={pads})")
        b.pending_pad_check()
        b.pad = [pads[2], pads[3], pads[6], pads[7]]
    elif op == "Flatten":
        axis = a.get("axis", 1)
        shape = b.shape
        axis = axis % len(shape) if axis else 0
        b.reshape([int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))])
    elif op == "Reshape":
        b.reshape([int(v) for v in args[1]])
    elif op == "Transpose":
        perm = a.get("perm", list(range(len(b.shape)))[::-1])
        b.relayout(b._index().transpose(perm))
    elif op == "BatchNormalization":
        if a.get("training_mode", 0):
            raise OnnxImportError(f"{b.where}: BatchNormalization in training mode")
        scale, bias, mean, var = (np.asarray(t, dtype=np.float64) for t in args[1:5])
        dims = len(b.shape)
        if dims == 2:
            b.flat()
        m = nn.BatchNorm2d(len(scale), eps=float(a.get("epsilon", 1e-5))) if dims == 4 else \
            nn.BatchNorm1d(len(scale), eps=float(a.get("epsilon", 1e-5)))
        if dims not in (2, 4):
            raise OnnxImportError(f"{b.where}: BatchNormalization on a {dims}-d tensor")
        with torch.no_grad():
            m.weight.copy_(_f32(scale))
            m.bias.copy_(_f32(bias))
            m.running_mean.copy_(_f32(mean))
            m.running_var.copy_(_f32(var))
        b.add(m)
    elif op == "AveragePool":
        if a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise OnnxImportError(f"{b.where}: AveragePool with ceil_mode or auto_pad is not supported")
        k = list(a["kernel_shape"])
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if len(k) != 2 or pads[0] != pads[2] or pads[1] != pads[3] or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise OnnxImportError(f"{b.where}: only 2-d average pooling with symmetric pads is supported")
        if any(pads) and not a.get("count_include_pad", 0):
            raise OnnxImportError(f"{b.where}: AveragePool with padding and count_include_pad=0 is not supported")
        b.add(nn.AvgPool2d(tuple(k), stride=tuple(a.get("strides", [1, 1])), padding=(pads[0], pads[1]),
                           count_include_pad=True))  # the same function when there is no padding
    else:  # pragma: no cover - _check_graph refuses it first
        raise OnnxImportError(f"unsupported op {op} ({b.where})")


def _static_shape(value_info) -> tuple[int, ...]:
    dims = []
    for k, d in enumerate(value_info.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif k == 0:
            dims.append(1)  # a symbolic batch dimension
        else:
            raise OnnxImportError(f"input {value_info.name!r} has a symbolic dimension {k} "
                                  f"({d.dim_param or '?'}); only the batch dimension may be symbolic")
    if not dims:
        raise OnnxImportError(f"input {value_info.name!r} has no shape")
    if dims[0] != 1 or len(dims) == 1:  # no batch dimension in the file
        dims = [1, *dims]
    return tuple(dims)


def load_proto(path: str | os.PathLike):
    """The ``ModelProto`` of ``path`` (``.onnx`` or ``.onnx.gz``)."""
    import onnx
    return onnx.load_model_from_string(read_maybe_gz(path))


def load_onnx(path: str | os.PathLike, check: bool = True, samples: int = 8, seed: int = 0) -> nn.Sequential:
    """The ONNX network at ``path`` (``.onnx`` or ``.onnx.gz``) as a float32 eval-mode ``nn.Sequential``.

    Unsupported ops, branches and forms raise :class:`OnnxImportError` naming the op and the node (the
    whole graph is checked before anything is converted). The model has an attribute ``onnx_input``
    (:class:`OnnxInput`) mapping the ONNX input layout to its own. When the network does not end in a
    ``Gemm``/``MatMul`` an identity ``Linear`` is appended (the bound code splits off a final Linear;
    its function is the same). With ``check`` (default) the model's outputs on ``samples`` random inputs
    are compared with onnxruntime's (or, without onnxruntime, with certdist's numpy evaluator) and a
    difference above ``1e-4 * (1 + max |output|)`` raises :class:`OnnxImportError`."""
    from onnx import numpy_helper
    proto = load_proto(path)
    g = proto.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    input_name = _check_graph(g, set(consts))
    vi = next(i for i in g.input if i.name == input_name)
    if vi.type.tensor_type.elem_type not in (1,):  # FLOAT
        raise OnnxImportError(f"input {input_name!r} is not float32 (ONNX elem_type "
                              f"{vi.type.tensor_type.elem_type})")
    b = _Builder(input_name, _static_shape(vi))
    current = input_name
    for k, node in enumerate(g.node):
        b.where = _node_name(node, k)
        a = _attrs(node)
        if node.op_type == "Shape" and node.input[0] == current:
            consts[node.output[0]] = np.array(b.shape, dtype=np.int64)
            continue
        if current not in node.input:  # a constant node
            args = [consts.get(n) if n else None for n in node.input]
            if any(v is None for n, v in zip(node.input, args) if n):
                raise OnnxImportError(f"{b.where}: an input is neither constant nor the network's tensor")
            consts[node.output[0]] = _fold(node, args, a)
            continue
        args = [None if n == current else (consts.get(n) if n else None) for n in node.input]
        _convert(b, node, args, a)
        current = node.output[0]
    if current != g.output[0].name:  # pragma: no cover - guaranteed by _check_graph's chain rule
        raise OnnxImportError(f"the graph's output {g.output[0].name!r} is not the end of the chain")
    b.where = "the output"
    b.pending_pad_check()
    if b.view is not None:
        if b.layers:
            b.flat()  # a final reshape of a flat output is harmless; anything else is refused below
            if b.view is not None and b.view.ndim == 2 and np.array_equal(b.view.ravel(), np.arange(b.view.size)):
                b.view = None
        if b.view is not None:
            raise OnnxImportError("the network ends in a Transpose/Reshape of its output")
    if not b.layers or not isinstance(b.layers[-1], nn.Linear):
        n = b.flat() if b.layers else int(np.prod(b.shape[1:]))
        b.linear(np.eye(n), None)
    model = nn.Sequential(*b.layers).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.onnx_input = OnnxInput(input_name, b.onnx_shape, b.model_shape, b.input_index)
    model.onnx_path = str(path)
    _check_contract(model, b.model_shape)
    if check:
        check_against_onnx(model, proto, samples, seed)
    return model


def _check_contract(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """The layer-support contract (certdist.models.support), which every algorithm is tested against."""
    from certdist.models.support import check_supported
    try:
        check_supported(model, input_shape)
    except ValueError as e:
        raise OnnxImportError(f"the converted network is outside the verifier's layer contract: {e}") from e


def onnx_session(source: Any, optimize: bool = True):
    """An onnxruntime CPU session for a path (``.gz`` too) or a ``ModelProto``; ``optimize=False``
    disables graph optimisations (every op computed as written, in float32)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = source.SerializeToString() if hasattr(source, "SerializeToString") else read_maybe_gz(source)
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(sess, x_onnx: np.ndarray) -> np.ndarray:
    """Outputs ``[N, K]`` (flattened per sample) of ``x_onnx`` ``[N, *input shape]`` (float32), one
    sample at a time (graphs with a fixed batch of 1)."""
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    outs = []
    for i in range(x_onnx.shape[0]):
        xi = np.ascontiguousarray(x_onnx[i:i + 1], dtype=np.float32)
        if len(shape) == xi.ndim - 1:  # no batch dimension in the file
            xi = xi[0]
        outs.append(np.asarray(sess.run(None, {name: xi})[0], dtype=np.float32).reshape(-1))
    return np.stack(outs)


def check_against_onnx(model: nn.Module, proto, samples: int = 8, seed: int = 0) -> float:
    """Max |model - onnxruntime| on random inputs (uniform in [0, 1] and standard normal); raises
    :class:`OnnxImportError` above ``1e-4 * (1 + max |output|)``."""
    info = onnx_input_of(model)
    rng = np.random.default_rng(seed)
    n = info.size
    flat = np.concatenate([rng.random((samples - samples // 2, n)), rng.standard_normal((samples // 2, n))])
    flat = flat.astype(np.float32)
    x_onnx = flat.reshape(len(flat), *info.shape[1:])
    try:
        ref = run_session(onnx_session(proto), x_onnx)
    except ImportError:
        from certdist.interop.onnx_numpy import run_onnx
        ref = np.stack([np.asarray(run_onnx(proto, x_onnx[i:i + 1])).reshape(-1) for i in range(len(flat))])
    with torch.no_grad():
        out = model(info.to_model(torch.from_numpy(flat))).numpy().reshape(len(flat), -1)
    if out.shape != ref.shape:
        raise OnnxImportError(f"converted model gives outputs of shape {out.shape[1:]}, ONNX {ref.shape[1:]}")
    err = float(np.abs(out - ref).max())
    if not err <= 1e-4 * (1 + float(np.abs(ref).max())):
        raise OnnxImportError(f"the converted model differs from the ONNX graph by {err:.3g} (a conversion bug; "
                              "please report it with the file)")
    return err


__all__ = ["CONSTANT_OPS", "LAYER_OPS", "OnnxImportError", "OnnxInput", "check_against_onnx", "load_onnx",
           "load_proto", "onnx_input_of", "onnx_session", "read_maybe_gz", "run_session"]
