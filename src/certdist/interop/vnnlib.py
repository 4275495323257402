"""VNN-LIB: write one robustness property per test point (:func:`export_vnnlib`; the assertions describe
the *unsafe* set: input in the box and some class ``j != y`` with ``Y_j >= Y_y``) and read general
properties (:func:`parse_vnnlib`: a box and a disjunction of linear output constraints). Inputs are
flattened in C order (channel, row, column), as ONNX verifiers read ``X_i``."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from certdist.threats import ThreatModel

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
