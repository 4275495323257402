"""Export to the formats of the verification community: ONNX networks and VNN-LIB properties.

- :func:`export_onnx`: the eval-mode network, normalisation included, built node by node from
  ``model.layers()`` (no tracing, no onnxscript), checked with ``onnx.checker`` and against torch's
  outputs with a small numpy evaluator of the graph (:func:`run_onnx`), and with onnxruntime as well
  when it is installed.
- :func:`export_vnnlib` / :func:`parse_vnnlib`: one robustness property per test point in the VNN-COMP
  format (the assertions describe the *unsafe* set: input in the box and some class ``j != y`` with
  ``Y_j >= Y_y``).
- :func:`export_benchmark`: a VNN-COMP benchmark folder (``onnx/``, ``vnnlib/``, ``instances.csv``).

Inputs are flattened in C order (channel, row, column), as ONNX verifiers read ``X_i``.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from certdist.models.cnn import flat_layers
from certdist.models.layers import Normalize
from certdist.models.support import check_supported
from certdist.propagation.ibp import check_fixed_batchnorm
from certdist.threats import ThreatModel

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


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _emit(g: _Graph, m: nn.Module, rank: int = 2) -> None:
    """The nodes of layer ``m`` on an input of ``rank`` dimensions (batch included)."""
    if isinstance(m, Normalize):
        g.add("Sub", g.const("mean", _np(m.mean)))
        g.add("Div", g.const("std", _np(m.std)))
    elif isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise TypeError(f"cannot export {m}: only numeric zero padding")
        p = _pair(m.padding)
        bias = [g.const("conv_b", _np(m.bias))] if m.bias is not None else []
        g.add("Conv", g.const("conv_w", _np(m.weight)), *bias, kernel_shape=list(m.kernel_size),
              strides=_pair(m.stride), pads=[p[0], p[1], p[0], p[1]], dilations=_pair(m.dilation), group=m.groups)
    elif isinstance(m, nn.Linear) and rank != 2:  # on the last dimension of [N, ..., in] (Gemm is 2-D only)
        g.add("MatMul", g.const("fc_wt", _np(m.weight).T))
        if m.bias is not None:
            g.add("Add", g.const("fc_b", _np(m.bias)))
    elif isinstance(m, nn.Linear):
        b = _np(m.bias) if m.bias is not None else np.zeros(m.out_features)
        g.add("Gemm", g.const("fc_w", _np(m.weight)), g.const("fc_b", b), transB=1)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        w = _np(m.weight) if m.weight is not None else np.ones(m.num_features)
        b = _np(m.bias) if m.bias is not None else np.zeros(m.num_features)
        g.add("BatchNormalization", g.const("bn_scale", w), g.const("bn_bias", b),
              g.const("bn_mean", _np(m.running_mean)), g.const("bn_var", _np(m.running_var)), epsilon=float(m.eps))
    elif isinstance(m, nn.ReLU):
        g.add("Relu")
    elif isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise TypeError(f"cannot export {m}: only Flatten(1, -1)")
        g.add("Flatten", axis=1)
    elif isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or m.divisor_override is not None:
            raise TypeError(f"cannot export {m}: ceil_mode / divisor_override")
        k, p = _pair(m.kernel_size), _pair(m.padding)
        g.add("AveragePool", kernel_shape=k, strides=_pair(m.stride if m.stride is not None else m.kernel_size),
              pads=[p[0], p[1], p[0], p[1]], count_include_pad=int(m.count_include_pad))
    elif isinstance(m, (nn.Identity, nn.Dropout)):
        return
    else:
        raise TypeError(f"cannot export layer {type(m).__name__} to ONNX")


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


# ---------------------------------------------------------------------------------------------------
# A tiny numpy evaluator of ONNX graphs (the ops the exporter writes, and a few more).

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


# ---------------------------------------------------------------------------------------------------
# VNN-LIB.

def _num(v: float) -> str:
    """Shortest exact positional decimal (no exponent: SMT-LIB has none)."""
    return np.format_float_positional(float(v), trim="0", unique=True)


def export_vnnlib(x: torch.Tensor, y: int, eps: float, num_classes: int, path: str | os.PathLike,
                  data_min: float = 0.0, data_max: float = 1.0) -> Path:
    """Write the robustness property of point ``x`` (any shape, flattened in C order) with label ``y``:
    the unsafe set is the box ``clip(x +- eps, data_min, data_max)`` and ``OR_{j != y} Y_j >= Y_y``."""
    if not 0 <= int(y) < num_classes:
        raise ValueError(f"label {y} outside [0, {num_classes})")
    box = ThreatModel(float(eps), data_min=data_min, data_max=data_max).box(x.detach().float().cpu().reshape(1, -1))
    lo, hi = box.lower[0].tolist(), box.upper[0].tolist()
    n = len(lo)
    lines = [f"; certdist robustness property: label {int(y)}, eps {eps}, input range [{data_min}, {data_max}]", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)] + [""]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)] + ["", "; input box"]
    for i in range(n):
        lines += [f"(assert (<= X_{i} {_num(hi[i])}))", f"(assert (>= X_{i} {_num(lo[i])}))"]
    lines += ["", f"; unsafe: some class scores at least as high as class {int(y)}", "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{int(y)}))" for j in range(num_classes) if j != int(y)] + ["))", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


@dataclass(frozen=True)
class VnnlibProperty:
    """``lower <= X <= upper`` (flat) and the unsafe output set as a disjunction of conjunctions: the
    output ``Y`` is unsafe iff for some ``(A, b)`` in ``disjuncts`` every row of ``A Y <= b`` holds."""

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: list[tuple[np.ndarray, np.ndarray]]
    num_outputs: int

    def unsafe(self, y: np.ndarray, tol: float = 0.0) -> bool:
        return any(bool(np.all(A @ y <= b + tol)) for A, b in self.disjuncts)


def _tokens(text: str) -> list[str]:
    text = re.sub(r";[^\n]*", " ", text)
    return re.findall(r"\(|\)|[^\s()]+", text)


def _sexprs(tokens: list[str]) -> list:
    stack: list[list] = [[]]
    for t in tokens:
        if t == "(":
            stack.append([])
        elif t == ")":
            if len(stack) == 1:
                raise ValueError("unbalanced ')' in VNN-LIB")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(t)
    if len(stack) != 1:
        raise ValueError("unbalanced '(' in VNN-LIB")
    return stack[0]


_VAR = re.compile(r"^([XY])_(\d+)$")


def _linear(term, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A linear term as (coefficients on X, coefficients on Y, constant)."""
    cx, cy = np.zeros(nx), np.zeros(ny)
    if isinstance(term, str):
        m = _VAR.match(term)
        if m:
            (cx if m.group(1) == "X" else cy)[int(m.group(2))] = 1.0
            return cx, cy, 0.0
        return cx, cy, float(term)
    op, *args = term
    parts = [_linear(a, nx, ny) for a in args]
    if op == "+":
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)
    if op == "-":
        if len(parts) == 1:
            return -parts[0][0], -parts[0][1], -parts[0][2]
        first, rest = parts[0], parts[1:]
        return (first[0] - sum(p[0] for p in rest), first[1] - sum(p[1] for p in rest),
                first[2] - sum(p[2] for p in rest))
    if op == "*":
        var_parts = [p for p in parts if p[0].any() or p[1].any()]
        if len(var_parts) > 1:
            raise ValueError(f"non-linear term in VNN-LIB: {term}")
        k = float(np.prod([p[2] for p in parts if not (p[0].any() or p[1].any())]))
        if not var_parts:
            return cx, cy, k
        v = var_parts[0]
        return k * v[0], k * v[1], k * v[2]
    raise ValueError(f"unsupported VNN-LIB operator {op!r}")


def _dnf(expr, nx: int, ny: int) -> list[list[tuple[np.ndarray, np.ndarray, float]]]:
    """An assertion as a disjunction of conjunctions of ``cx.X + cy.Y <= c`` constraints."""
    op = expr[0]
    if op == "or":
        return [conj for e in expr[1:] for conj in _dnf(e, nx, ny)]
    if op == "and":
        out: list[list] = [[]]
        for e in expr[1:]:
            out = [a + b for a in out for b in _dnf(e, nx, ny)]
        return out
    if op in ("<=", ">=") and len(expr) == 3:
        ax, ay, ac = _linear(expr[1], nx, ny)
        bx, by, bc = _linear(expr[2], nx, ny)
        lhs = (ax - bx, ay - by, bc - ac)  # lhs <= rhs  <=>  (a - b).v <= bc - ac
        if op == ">=":
            lhs = (-lhs[0], -lhs[1], -lhs[2])
        return [[lhs]]
    raise ValueError(f"unsupported VNN-LIB assertion {expr}")


def parse_vnnlib(source: str | os.PathLike) -> VnnlibProperty:
    """Parse a VNN-LIB property (a path, or the text itself when it contains '(').

    Supported: ``declare-const`` of ``X_i`` / ``Y_j``; input bounds ``(<= X_i c)`` / ``(>= X_i c)`` as
    top-level assertions; output constraints (linear in ``Y``) combined with ``and`` / ``or``, top-level
    assertions being conjoined. Inputs inside a disjunction raise ValueError."""
    text = source if isinstance(source, str) and "(" in source else Path(source).read_text()
    exprs = _sexprs(_tokens(text))
    names = [e[1] for e in exprs if isinstance(e, list) and e and e[0] == "declare-const"]
    nx = sum(1 for n in names if n.startswith("X_"))
    ny = sum(1 for n in names if n.startswith("Y_"))
    lower, upper = np.full(nx, -np.inf), np.full(nx, np.inf)
    out: list[list] = [[]]
    for e in exprs:
        if not isinstance(e, list) or not e or e[0] != "assert":
            continue
        dnf = _dnf(e[1], nx, ny)
        if all(not c[0].any() for conj in dnf for c in conj):  # output-only assertion
            out = [a + b for a in out for b in dnf]
            continue
        if len(dnf) != 1 or any(c[1].any() for c in dnf[0]):
            raise ValueError(f"unsupported assertion mixing inputs with disjunctions or outputs: {e}")
        for cx, _, c in dnf[0]:
            i = np.flatnonzero(cx)
            if len(i) != 1:
                raise ValueError(f"only bounds on single inputs are supported, got {e}")
            k = cx[i[0]]
            if k > 0:
                upper[i[0]] = min(upper[i[0]], c / k)
            else:
                lower[i[0]] = max(lower[i[0]], c / k)
    disjuncts = [(np.stack([c[1] for c in conj]) if conj else np.zeros((0, ny)),
                  np.array([c[2] for c in conj])) for conj in out]
    return VnnlibProperty(lower, upper, disjuncts, ny)


# ---------------------------------------------------------------------------------------------------
# A VNN-COMP benchmark folder.

_OWNED = re.compile(r"(onnx/[^/\\]+\.onnx|vnnlib/prop_\d+_eps_[^/\\]+\.vnnlib)")


def _earlier_export(out: Path) -> set[str]:
    """The files (relative paths) of an earlier :func:`export_benchmark` into ``out``: the ONNX and VNN-LIB
    files its ``instances.csv`` lists and every ``vnnlib/prop_<index>_eps_<eps>.vnnlib``; only names of the
    forms export writes, never other files."""
    owned: set[str] = set()
    csv_path = out / "instances.csv"
    if csv_path.is_file():
        for line in csv_path.read_text(errors="replace").splitlines():
            owned |= {rel.strip() for rel in line.split(",")[:2] if _OWNED.fullmatch(rel.strip())}
    if (out / "vnnlib").is_dir():
        owned |= {f"vnnlib/{f.name}" for f in (out / "vnnlib").glob("prop_*_eps_*.vnnlib")
                  if _OWNED.fullmatch(f"vnnlib/{f.name}")}
    return owned


def export_benchmark(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
                     out_dir: str | os.PathLike, limit: int | None = None, timeout: float = 300.0,
                     skip_misclassified: bool = True, name: str = "model") -> Path:
    """Write ``onnx/<name>.onnx``, ``vnnlib/prop_<index>_eps_<eps>.vnnlib`` for the first ``limit``
    points (misclassified ones skipped by default) and ``instances.csv`` (``onnx,vnnlib,timeout``
    per line, paths relative to ``out_dir``). Returns the path of ``instances.csv``.

    Exporting again into the same folder replaces the earlier export: its files that this one does not
    rewrite (ONNX / VNN-LIB files its ``instances.csv`` lists, and ``vnnlib/prop_*_eps_*.vnnlib``) are
    removed, so that no stale property is left beside the new ones; other files are never touched."""
    if not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"images must be floats in [0, 1] shaped [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)} (convert uint8 images with .float() / 255)")
    check_supported(model, tuple(images.shape[1:]))  # the layer-support contract, before any copy or file
    out = Path(out_dir)
    earlier = _earlier_export(out)
    net = copy.deepcopy(model).eval()
    onnx_rel = f"onnx/{name}.onnx"
    export_onnx(net, out / onnx_rel, tuple(images.shape[1:]))
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    with torch.no_grad():
        preds = net(images[:n]).argmax(1) if n else torch.zeros(0, dtype=torch.long)
    rows = []
    num_classes = int(net(images[:1]).shape[1])
    for i in range(n):
        if skip_misclassified and int(preds[i]) != int(labels[i]):
            continue
        rel = f"vnnlib/prop_{i}_eps_{eps:.6g}.vnnlib"
        export_vnnlib(images[i], int(labels[i]), eps, num_classes, out / rel)
        rows.append(f"{onnx_rel},{rel},{timeout:g}")
    written = {onnx_rel} | {row.split(",")[1] for row in rows}
    for rel in sorted(earlier - written):
        (out / rel).unlink(missing_ok=True)
    path = out / "instances.csv"
    path.write_text("\n".join(rows) + ("\n" if rows else ""))
    return path
