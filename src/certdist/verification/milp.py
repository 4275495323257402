"""Exact verification of a ReLU network by mixed-integer linear programming (HiGHS).

Big-M formulation (Tjeng et al. 2019) on the dense chain of :mod:`certdist.verification.dense`,
with pre-activation bounds ``[l, u]`` from IBP/CROWN: for an unstable ReLU ``a = relu(z)``

    a >= z,  a >= 0,  a <= u d,  a <= z - l (1 - d),  d in {0, 1};

a stable one is linear (``a = z`` or ``a = 0``). Each margin ``c^T logits`` is minimised separately;
a row is verified only when HiGHS *proves* a bound (status optimal, or a MIP dual bound at the time
limit) above the row's tolerance plus ``VERIFY_TOL`` (the tolerance covers float32 evaluation of the
network, :mod:`certdist.verification.rounding`). Any other status (infeasible: impossible, since the
clean input is feasible, so a numerical failure; unbounded; errors) gives ``unknown``, and so does a
program whose big-M coefficients or bounds exceed ``MAX_COEFFICIENT`` (HiGHS's absolute tolerances
are meaningless there; :attr:`Formulation.unreliable` says why). A primal solution with a negative
margin is only a *candidate* counterexample: the caller's ``check`` (the eval-mode torch model)
decides. A leaf of branch and bound (all ReLUs fixed) is the same program without integers.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from certdist.verification.dense import DenseNet

VERIFY_TOL = 1e-6
MAX_COEFFICIENT = 1e6


@dataclass
class Formulation:
    highs: object
    n_inputs: int
    out_cols: np.ndarray        # columns of the last ReLU layer's activations (or the inputs)
    num_binaries: int
    unreliable: str = ""        # why no bound of this program may be trusted ("" if none)


@dataclass
class RowResult:
    status: str                 # verified | falsified | unknown
    lower: float                # proven lower bound of the margin
    value: float | None         # best primal margin found
    x: np.ndarray | None        # input of the best primal solution
    message: str = ""           # why no bound was proved (solver status, unreliable program)


@dataclass
class MilpResult:
    status: str                 # verified | falsified | unknown
    lower: float                # min over rows of the proven lower bounds
    counterexample: torch.Tensor | None = None
    rows: list[RowResult] = field(default_factory=list)
    message: str = ""


_BANNER_SHOWN = False


def _quiet_highs():
    """A ``Highs`` instance; the banner HiGHS prints to stdout on its first construction is swallowed
    (it would break progress bars and piped output)."""
    global _BANNER_SHOWN
    import highspy
    if _BANNER_SHOWN:
        return highspy.Highs()
    _BANNER_SHOWN = True
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (some notebooks): nothing to protect
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _new_highs(threads: int):
    h = _quiet_highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.setOptionValue("mip_rel_gap", 1e-9)
    return h


class _Rows:
    """Accumulates sparse rows ``lo <= sum v x <= hi`` and passes them to HiGHS in one call."""

    def __init__(self) -> None:
        self.lo, self.hi, self.starts, self.idx, self.val = [], [], [], [], []
        self.nnz = 0

    def add(self, idx: np.ndarray, val: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows given as 2-D arrays ``idx/val`` [R, m] (same length per row) and bounds [R]."""
        R, m = idx.shape
        self.starts.append(self.nnz + m * np.arange(R))
        self.idx.append(idx.ravel())
        self.val.append(val.ravel())
        self.lo.append(lo)
        self.hi.append(hi)
        self.nnz += R * m

    def pass_to(self, h) -> None:
        if not self.lo:
            return
        lo, hi = np.concatenate(self.lo), np.concatenate(self.hi)
        h.addRows(len(lo), lo, hi, self.nnz, np.concatenate(self.starts).astype(np.int32),
                  np.concatenate(self.idx).astype(np.int32), np.concatenate(self.val).astype(np.float64))


def build(net: DenseNet, x_lo: np.ndarray, x_hi: np.ndarray, lbs: list[np.ndarray], ubs: list[np.ndarray],
          threads: int = 1) -> Formulation:
    """The big-M program of ``net`` over the input box with pre-activation bounds ``lbs/ubs``
    (flat, one per ReLU layer; split constraints are expressed through them)."""
    import highspy
    h = _new_highs(threads)
    inf = highspy.kHighsInf
    rows = _Rows()
    n0 = x_lo.size
    h.addVars(n0, x_lo.astype(np.float64), x_hi.astype(np.float64))
    prev = np.arange(n0)
    ncol, nbin = n0, 0
    for k in range(net.num_relu_layers):
        W, b = net.weights[k].numpy(), net.biases[k].numpy()
        l, u = lbs[k].astype(np.float64), ubs[k].astype(np.float64)
        u = np.maximum(u, l)
        n = W.shape[0]
        z = ncol + np.arange(n)
        a = z + n
        h.addVars(n, l, u)
        h.addVars(n, np.maximum(l, 0), np.maximum(u, 0))
        ncol += 2 * n
        # z - W a_prev = b
        idx = np.concatenate([z[:, None], np.broadcast_to(prev, (n, prev.size))], axis=1)
        rows.add(idx, np.concatenate([np.ones((n, 1)), -W], axis=1), b, b)
        act = l >= 0
        if act.any():
            rows.add(np.stack([a[act], z[act]], 1), np.tile([1.0, -1.0], (int(act.sum()), 1)),
                     np.zeros(act.sum()), np.zeros(act.sum()))
        unst = np.flatnonzero((l < 0) & (u > 0))
        m = unst.size
        if m:
            d = ncol + np.arange(m)
            h.addVars(m, np.zeros(m), np.ones(m))
            h.changeColsIntegrality(m, d.astype(np.int32), np.array([highspy.HighsVarType.kInteger] * m))
            ncol += m
            nbin += m
            au, zu, lu, uu = a[unst], z[unst], l[unst], u[unst]
            rows.add(np.stack([au, zu], 1), np.tile([1.0, -1.0], (m, 1)), np.zeros(m), np.full(m, inf))
            rows.add(np.stack([au, d], 1), np.stack([np.ones(m), -uu], 1), np.full(m, -inf), np.zeros(m))
            rows.add(np.stack([au, zu, d], 1), np.stack([np.ones(m), -np.ones(m), -lu], 1),
                     np.full(m, -inf), -lu)
        prev = a
    rows.pass_to(h)
    return Formulation(h, n0, prev, nbin, _unreliable([*(w.numpy() for w in net.weights),
                                                       *(b.numpy() for b in net.biases), x_lo, x_hi, *lbs, *ubs]))


def _unreliable(arrays: list[np.ndarray]) -> str:
    """A reason not to trust HiGHS on a program with these coefficients and bounds (the big-M values are
    the pre-activation bounds): non-finite or huge ones."""
    if not all(np.isfinite(a).all() for a in arrays):
        return "non-finite weights, input box or pre-activation bounds"
    big = max(float(np.abs(a).max(initial=0.0)) for a in arrays)
    if big > MAX_COEFFICIENT:
        return (f"big-M coefficients/bounds up to {big:.3g} exceed {MAX_COEFFICIENT:.0e}: HiGHS's tolerances "
                "cannot give a trustworthy bound (rescale the network)")
    return ""


def solve_row(form: Formulation, net: DenseNet, c: np.ndarray, time_limit: float,
              target: float | None = None, tol: float = 0.0, max_nodes: int | None = None) -> RowResult:
    """Minimise ``c^T logits``; stop early once a margin below ``target`` is found, or after ``max_nodes``
    branch-and-bound nodes (the effort budget; with one thread HiGHS is deterministic, so the verdict does
    not depend on the machine). The row is verified when a proved bound exceeds ``tol + VERIFY_TOL``;
    ``lower`` is -inf unless HiGHS proved it."""
    import highspy
    h = form.highs
    W, b = net.weights[-1].numpy(), net.biases[-1].numpy()
    cost = c @ W
    h.changeColsCost(cost.size, form.out_cols.astype(np.int32), cost.astype(np.float64))
    h.changeObjectiveOffset(float(c @ b))
    h.setOptionValue("time_limit", max(float(time_limit), 1e-3))
    h.setOptionValue("objective_target", -np.inf if target is None else float(target))
    h.setOptionValue("mip_max_nodes", int(max_nodes) if max_nodes is not None else 2**31 - 1)
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    S = highspy.HighsModelStatus
    has_sol = info.primal_solution_status == 2 and st != S.kInfeasible  # kSolutionStatusFeasible
    value = float(info.objective_function_value) if has_sol else None
    x = np.array(h.getSolution().col_value[:form.n_inputs]) if has_sol else None
    lower = -float("inf")
    if form.unreliable:
        pass
    elif form.num_binaries == 0:
        if st == S.kOptimal and value is not None:
            lower = value
    elif st in (S.kOptimal, S.kTimeLimit, S.kSolutionLimit):  # the dual bound is proved (node limit too)
        lower = float(info.mip_dual_bound)
        lower = lower if np.isfinite(lower) else -float("inf")
    message = form.unreliable or ("" if st in (S.kOptimal, S.kTimeLimit, S.kObjectiveTarget)
                                  else "node limit" if st == S.kSolutionLimit
                                  else f"HiGHS status {h.modelStatusToString(st)!r}: no proved bound")
    status = "verified" if lower > tol + VERIFY_TOL else ("falsified" if value is not None and value < 0 else "unknown")
    return RowResult(status, lower, value, x, message)


def milp_verify(net: DenseNet, x_lo: torch.Tensor, x_hi: torch.Tensor, C: torch.Tensor,
                lbs: list[torch.Tensor], ubs: list[torch.Tensor], time_limit: float,
                check: Callable[[torch.Tensor], torch.Tensor | None], threads: int = 1,
                tol: torch.Tensor | float = 0.0, max_nodes: int | None = None) -> MilpResult:
    """Decide ``C logits > tol`` on the box (flat ``x_lo/x_hi`` [n_0], ``C`` [S, K], bounds [n_k];
    ``tol``: [S] or a number, the float32 tolerance of each row, see :mod:`certdist.verification.rounding`).

    ``check(x)`` takes a candidate input (flat, float64) and returns the validated counterexample
    (in the model's input shape) or ``None``; only validated points are reported as falsified. Primal
    points with a margin below the row's tolerance are candidates too (float32 may misclassify them).
    ``max_nodes``: HiGHS's node budget per row (None: until the time limit)."""
    deadline = time.monotonic() + time_limit
    form = build(net, x_lo.numpy(), x_hi.numpy(), [l.numpy() for l in lbs], [u.numpy() for u in ubs], threads)
    tols = torch.as_tensor(tol, dtype=torch.float64).expand(C.shape[0]).tolist()
    res = MilpResult("verified", float("inf"))
    for c, t in zip(C.to(torch.float64).numpy(), tols):
        left = deadline - time.monotonic()
        if left <= 0:
            res.status, res.message = "unknown", "time limit"
            res.lower = -float("inf")
            return res
        row = solve_row(form, net, c, left, target=-VERIFY_TOL, tol=t, max_nodes=max_nodes)
        if row.status != "verified":
            cex = _candidate(row, t, check)
            if cex is None and row.status == "falsified" and form.num_binaries and deadline > time.monotonic():
                row = solve_row(form, net, c, deadline - time.monotonic(), tol=t, max_nodes=max_nodes)  # solve fully
                cex = _candidate(row, t, check)
            if cex is not None:
                res.status, res.counterexample = "falsified", cex
                res.rows.append(row)
                res.lower = min(res.lower, row.lower)
                return res
            if row.status == "falsified":
                row.status = "unknown"
        res.rows.append(row)
        res.lower = min(res.lower, row.lower)
        if row.status != "verified":
            res.status = "unknown"
            res.message = row.message or ("candidate counterexample failed the re-check"
                                          if row.value is not None and row.value < t + VERIFY_TOL else "time limit")
    return res


def _candidate(row: RowResult, tol: float, check: Callable[[torch.Tensor], torch.Tensor | None]):
    """The validated counterexample at the row's primal point, if its margin is within the tolerance."""
    if row.x is None or row.value is None or not row.value < tol + VERIFY_TOL:
        return None
    return check(torch.from_numpy(row.x))
