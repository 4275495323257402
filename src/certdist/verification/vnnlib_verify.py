"""Verify general VNN-LIB properties of ONNX networks (the VNN-COMP task): ``sat`` / ``unsat`` /
``timeout`` / ``unknown``.

A VNN-LIB file states the *unsafe* region: an input box (one interval per ``X_i``) and a disjunction of
conjunctions of linear constraints ``A Y <= b`` over the outputs. The property holds (``unsat``) when
no input in the box reaches any disjunct; it is violated (``sat``) when some input does.

:func:`verify_vnnlib` runs, until the first verdict or the timeout:

1. ``sample``: random points of the box (and its centre) on the float32 network;
2. ``pgd``: projected gradient descent on the box minimising each disjunct's largest constraint
   violation ``max_i (A_i y - b_i)``, all disjuncts in one batch;
3. ``ibp`` -> ``crown`` -> ``alpha-crown``: lower bounds of every row ``A_i y`` (the rows of all open
   disjuncts form the spec matrix ``C``); a disjunct is *infeasible* once one of its rows has
   ``lower(A_i y) - b_i`` above the row's float32 tolerance; ``unsat`` once every disjunct is;
4. ``pgd`` again with the time left (more restarts), then ``chain-bab`` (branch and bound on the layer
   chain) on one row of each open disjunct (the one closest to being proved).

Soundness policy (that of :mod:`certdist.verification.certify`): bounds in float64 on a float64 copy of
the network over the box (the file's decimals rounded to float64: rounding is monotone, so every float32
input inside the real box is inside it); a row proves its disjunct infeasible only when its lower bound
exceeds ``b_i`` plus its float32 tolerance (:mod:`certdist.verification.rounding`: how far the float32
outputs can be from the exact ones anywhere in the box; NaN proves nothing). A ``sat`` is reported only
for a float32 input inside the box whose outputs, computed by onnxruntime on the ONNX file itself (with
and without graph optimisations), satisfy every constraint of one disjunct.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certdist.bounds import Interval
from certdist.interop.onnx_import import load_onnx, onnx_input_of, onnx_session, read_maybe_gz, run_session
from certdist.propagation.ibp import exact_fp32, ibp
from certdist.interop.vnnlib import VnnlibProperty, parse_vnnlib
from certdist.verification.rounding import fp32_margin_tolerance, proved

RESULTS = ("sat", "unsat", "timeout", "unknown", "error")


@dataclass(frozen=True)
class VerifyConfig:
    """``timeout``: seconds per instance, everything included. ``samples``: random points of the box.
    ``pgd_steps`` / ``pgd_restarts``: the first attack (restarts per disjunct); the second, after the
    bounds, runs ``late_restarts`` restarts. ``odi_steps``: every random restart first takes this many
    steps up a random direction of the outputs (output-diversified initialisation, Tashiro et al. 2020:
    the starts spread over the output space, not only the input box). ``alpha_iterations``: alpha-CROWN steps (0 skips it);
    ``alpha_intermediate``: alpha-CROWN optimises the pre-activation bounds too (tighter on deep
    networks; branch and bound then starts from them).
    ``bab``: branch and bound on the open disjuncts with the time left. ``seed``: the random points."""

    timeout: float = 60.0
    samples: int = 1000
    pgd_steps: int = 50
    pgd_restarts: int = 10
    late_restarts: int = 50
    odi_steps: int = 10
    alpha_iterations: int = 20
    alpha_lr: float = 0.1
    alpha_intermediate: bool = True
    bab: bool = True
    bab_batch: int = 64
    bab_alpha_steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


@dataclass
class VerifyResult:
    """``result``: ``sat`` | ``unsat`` | ``timeout`` | ``unknown``; ``stage``: the stage that decided;
    ``counterexample``: for ``sat``, ``(x, y)``: the float32 input (flat, the ONNX file's C order) and
    onnxruntime's float32 outputs; ``open_disjuncts``: per stage, the disjuncts not yet proved infeasible
    after it (diagnostics)."""

    result: str
    stage: str
    time_s: float
    counterexample: tuple[np.ndarray, np.ndarray] | None = None
    message: str = ""
    open_disjuncts: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        """The VNN-COMP result file: ``unsat`` / ``timeout`` / ``unknown``, or ``sat`` and the
        counterexample ``((X_0 v) ... (Y_0 v) ...)``."""
        if self.result != "sat" or self.counterexample is None:
            return self.result + "\n"
        x, y = self.counterexample
        items = [f"(X_{i} {_num(v)})" for i, v in enumerate(x)] + [f"(Y_{j} {_num(v)})" for j, v in enumerate(y)]
        return "sat\n(" + "\n ".join(items) + ")\n"


def _num(v: float) -> str:
    return repr(float(v))  # shortest float64 round trip of the float32 value (exact)


# ---------------------------------------------------------------------------------------------------
# The network, once per ONNX file.

@dataclass
class OnnxNetwork:
    """What verification runs on: the float32 model read by :func:`certdist.load_onnx` (verdicts are
    about the file, confirmed by onnxruntime), its float64 copy (every bound), and onnxruntime sessions
    of the file with and without graph optimisations."""

    path: str
    net: nn.Module
    net64: nn.Module
    sessions: tuple

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OnnxNetwork":
        net = load_onnx(path)
        net64 = copy.deepcopy(net).double()
        for m in (net, net64):
            for p in m.parameters():
                p.requires_grad_(False)
        return cls(str(path), net, net64, (onnx_session(path), onnx_session(path, optimize=False)))


def read_property(path: str | os.PathLike) -> VnnlibProperty:
    """:func:`certdist.interop.vnnlib.parse_vnnlib` of ``path`` (``.vnnlib`` or ``.vnnlib.gz``, or
    the text itself when it contains '(')."""
    text = path if isinstance(path, str) and "(" in path else read_maybe_gz(path).decode()
    if "(" not in text:
        raise ValueError(f"{path}: not a VNN-LIB file (no assertions)")
    return parse_vnnlib(text)


def _float32_box(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 values inside ``[lo, hi]`` (float64): smallest float32 >= lo, largest <= hi."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    return lo32, hi32


class _Instance:
    """One (network, property) pair: the disjuncts as padded tensors, the box, the counterexample check."""

    def __init__(self, network: OnnxNetwork, prop: VnnlibProperty, cfg: VerifyConfig, deadline: float) -> None:
        self.network, self.prop, self.cfg, self.deadline = network, prop, cfg, deadline
        self.info = onnx_input_of(network.net)
        n = self.info.size
        if prop.lower.shape[0] != n:
            raise ValueError(f"the property has {prop.lower.shape[0]} inputs X_i, the network {n}")
        if not (np.isfinite(prop.lower).all() and np.isfinite(prop.upper).all()):
            raise ValueError("the property must bound every input X_i from both sides")
        with torch.no_grad():
            K = int(network.net(torch.zeros(1, *self.info.model_shape)).reshape(1, -1).shape[1])
        if prop.num_outputs != K:
            raise ValueError(f"the property has {prop.num_outputs} outputs Y_j, the network {K}")
        self.K = K
        self.lo, self.hi = prop.lower.astype(np.float64), prop.upper.astype(np.float64)
        self.lo32, self.hi32 = _float32_box(self.lo, self.hi)
        self.has_float32 = bool((self.lo32 <= self.hi32).all())
        to_model = lambda a: self.info.to_model(torch.from_numpy(a[None]))  # noqa: E731
        self.box64 = Interval(to_model(self.lo), to_model(self.hi))
        self.x64 = (self.box64.lower + self.box64.upper) / 2
        if self.has_float32:
            self.lo_m32, self.hi_m32 = to_model(self.lo32), to_model(self.hi32)
        D = len(prop.disjuncts)
        m = max([A.shape[0] for A, _ in prop.disjuncts] + [1])
        self.A = torch.zeros(D, m, K, dtype=torch.float64)
        self.b = torch.full((D, m), 1e30, dtype=torch.float64)  # padding rows: never the largest violation
        for d, (A, b) in enumerate(prop.disjuncts):
            self.A[d, :A.shape[0]] = torch.from_numpy(np.asarray(A, dtype=np.float64))
            self.b[d, :A.shape[0]] = torch.from_numpy(np.asarray(b, dtype=np.float64))
        self.rows = [A.shape[0] for A, _ in prop.disjuncts]
        self.open = [True] * D  # not yet proved infeasible

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- falsification ---------------------------------------------------------------------------------
    def violation(self, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``max_i (A_i y - b_i)`` of disjunct ``d[k]`` at outputs ``y[k]`` (<= 0: inside the disjunct;
        -inf for a disjunct without constraints)."""
        A, b = self.A[d].to(y.dtype), self.b[d].to(y.dtype)
        v = torch.einsum("nmk,nk->nm", A, y) - b
        empty = torch.tensor([r == 0 for r in self.rows], device=y.device)[d]
        return torch.where(empty, torch.full_like(v[:, 0], -float("inf")), v.max(dim=1).values)

    def confirm(self, xs: torch.Tensor, ds: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The first of the model-layout points ``xs`` that onnxruntime confirms inside one disjunct
        (after rounding to float32 and clipping into the float32 box): ``(x flat ONNX order, y)``."""
        if not self.has_float32 or xs.shape[0] == 0:
            return None
        x32 = torch.max(torch.min(xs.to(torch.float32), self.hi_m32), self.lo_m32)
        x_onnx = self.info.to_onnx(x32).numpy().astype(np.float32)
        flat = x_onnx.reshape(len(x_onnx), -1)
        if not ((flat >= self.lo32) & (flat <= self.hi32)).all():  # pragma: no cover - clipped above
            return None
        outs = [run_session(s, x_onnx) for s in self.network.sessions]
        for k in range(len(flat)):
            if all(self.prop.unsafe(o[k].astype(np.float64)) for o in outs):
                return flat[k].copy(), outs[0][k].copy()
        return None

    def _candidates(self, xs: torch.Tensor, ds: torch.Tensor, limit: int = 8):
        """Confirm the points whose float32 torch outputs are inside (or nearest to) their disjunct."""
        with torch.no_grad():
            v = self.violation(self.network.net(xs.to(torch.float32)).reshape(len(xs), -1).double(), ds)
        order = torch.argsort(v)
        inside = int((v <= 0).sum())
        pick = order[:max(min(inside, 64), min(limit, len(order)))]
        return self.confirm(xs[pick], ds[pick])

    def sample(self, count: int, gen: torch.Generator):
        if not self.has_float32:
            return None
        lo, hi = self.lo_m32.double(), self.hi_m32.double()
        u = torch.rand((count, *lo.shape[1:]), generator=gen, dtype=torch.float64)
        xs = torch.cat([(lo + hi) / 2, lo + u * (hi - lo)])
        D = len(self.open)
        best = None
        with torch.no_grad():
            y = self.network.net(xs.float()).reshape(len(xs), -1).double()
        for d in range(D):
            ds = torch.full((len(xs),), d, dtype=torch.long)
            v = self.violation(y, ds)
            order = torch.argsort(v)[:8 if (v <= 0).sum() == 0 else 64]
            best = self.confirm(xs[order], ds[order])
            if best is not None:
                return best
        return best

    def _diversify(self, x: torch.Tensor, width: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        """``odi_steps`` sign-gradient steps of each start up ``w . y`` for its own random ``w`` in
        [-1, 1]^K (output-diversified initialisation)."""
        steps = self.cfg.odi_steps
        if steps <= 0:
            return x
        w = torch.rand((x.shape[0], self.K), generator=gen, dtype=torch.float64) * 2 - 1
        for _ in range(steps):
            with torch.enable_grad():
                xv = x.float().requires_grad_(True)
                grad, = torch.autograd.grad((self.network.net(xv).reshape(len(x), -1).double() * w).sum(), xv)
            x = torch.max(torch.min(x + width / steps * grad.double().sign(), hi), lo)
        return x

    def pgd(self, restarts: int, steps: int, gen: torch.Generator):
        """PGD on the box minimising the violation of each open-or-not disjunct (all in one batch)."""
        if not self.has_float32 or steps <= 0 or restarts <= 0:
            return None
        D = len(self.open)
        lo, hi = self.lo_m32.double(), self.hi_m32.double()
        ds = torch.arange(D).repeat_interleave(restarts)
        N = len(ds)
        x = lo + torch.rand((N, *lo.shape[1:]), generator=gen, dtype=torch.float64) * (hi - lo)
        width = hi - lo
        net = self.network.net
        x = self._diversify(x, width, lo, hi, gen)
        x[::restarts] = (lo + hi)[0] / 2  # one restart per disjunct from the centre
        best_x, best_v = x.clone(), torch.full((N,), float("inf"), dtype=torch.float64)
        for step in range(steps):
            if step % 10 == 0 and self.left() <= 0:
                break
            with torch.enable_grad():
                xv = x.float().requires_grad_(True)
                v = self.violation(net(xv).reshape(N, -1).double(), ds)
                grad, = torch.autograd.grad(v.sum(), xv)
            with torch.no_grad():
                better = v.detach() < best_v
                best_v = torch.where(better, v.detach(), best_v)
                best_x[better] = x[better]
                size = 2.0 * (1 - step / steps) / steps + 0.02 / steps ** 0.5
                x = torch.max(torch.min(x - size * width * grad.double().sign(), hi), lo)
        with torch.no_grad():
            v = self.violation(net(x.float()).reshape(N, -1).double(), ds)
            better = v < best_v
            best_v = torch.where(better, v, best_v)
            best_x[better] = x[better]
        return self._candidates(best_x, ds, limit=min(N, 4 * D))

    # -- bounds ------------------------------------------------------------------------------------------
    def spec(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``C`` [1, S, K] and ``b`` [S] of the rows of the open disjuncts, and each row's disjunct."""
        rows, bs, owner = [], [], []
        for d, ok in enumerate(self.open):
            if ok:
                r = self.rows[d]
                rows.append(self.A[d, :r])
                bs.append(self.b[d, :r])
                owner += [d] * r
        return torch.cat(rows)[None], torch.cat(bs), owner

    def close(self, lower: torch.Tensor, b: torch.Tensor, tol: torch.Tensor, owner: list[int]) -> None:
        """Mark the disjuncts with a row proved infeasible: ``lower - b > tol`` (NaN never)."""
        ok = proved(torch.nan_to_num(lower, nan=-float("inf")) - b, tol)
        for i in torch.nonzero(ok).flatten().tolist():
            self.open[owner[i]] = False


def _bound_stages(inst: _Instance, res: VerifyResult) -> tuple[list[Interval] | None, dict[int, float]]:
    """IBP, CROWN, alpha-CROWN on the open disjuncts' rows; returns CROWN's pre-activation bounds and,
    per open disjunct, (best row, its lower bound minus ``b`` minus the tolerance)."""
    from certdist.propagation.alpha import alpha_crown
    from certdist.propagation.crown import crown
    net64, box, x64 = inst.network.net64, inst.box64, inst.x64  # the box itself: no threat model, no data range
    if any(ok and inst.rows[d] == 0 for d, ok in enumerate(inst.open)):  # no constraints: nothing to bound
        return None, {}
    C, b, owner = inst.spec()
    with torch.no_grad():
        best = ibp(net64, x64, None, C=C, box=box).lower[0]
        tol = fp32_margin_tolerance(net64, box, C)[0]
    inst.close(best, b, tol, owner)
    res.open_disjuncts["ibp"] = sum(inst.open)
    pre = None
    for stage in ("crown", "alpha-crown"):
        if not any(inst.open) or inst.left() <= 0:
            break
        if stage == "alpha-crown" and inst.cfg.alpha_iterations == 0:
            continue
        keep = torch.tensor([inst.open[d] for d in owner])
        C, b, best, tol = C[:, keep], b[keep], best[keep], tol[keep]
        owner = [d for d, k in zip(owner, keep.tolist()) if k]
        with torch.no_grad():
            if stage == "crown":
                out, pre = crown(net64, x64, None, C=C, intermediate="best", bound_upper=False,
                                 return_intermediate=True, box=box)
            else:
                out, tighter = alpha_crown(net64, x64, None, C=C, iterations=inst.cfg.alpha_iterations,
                                           lr=inst.cfg.alpha_lr, intermediate="crown", intermediate_bounds=pre,
                                           bound_upper=False, box=box, return_intermediate=True,
                                           optimize_intermediate=inst.cfg.alpha_intermediate)
                pre = [Interval(torch.maximum(a.lower, t.lower), torch.minimum(a.upper, t.upper))
                       for a, t in zip(pre, tighter)]
            # the float32 tolerance from the tighter pre-activation bounds (fewer ReLUs pass errors on)
            # (fmin: a NaN of an earlier tolerance does not hide a finite later one; each is a sound bound)
            tol = torch.fmin(tol, fp32_margin_tolerance(net64, box, C, relu_bounds=pre)[0])
        low = torch.nan_to_num(out.lower[0].detach(), nan=-float("inf"), posinf=-float("inf"))
        best = torch.maximum(best, low)
        inst.close(best, b, tol, owner)
        res.open_disjuncts[stage] = sum(inst.open)
    gap: dict[int, tuple[int, float, float]] = {}  # disjunct -> (row index in C, slack, threshold)
    for i, d in enumerate(owner):
        if inst.open[d]:
            s = float(best[i] - b[i] - tol[i])
            if d not in gap or s > gap[d][1]:
                gap[d] = (i, s, float(b[i] + tol[i]), C[0, i].clone())
    return pre, gap


def _bab(inst: _Instance, gap: dict, pre, res: VerifyResult):
    """Chain BaB on the best row of each open disjunct, the time left shared evenly among the disjuncts
    not yet tried (one that finishes early leaves its time to the rest); returns a confirmed
    counterexample or None."""
    from certdist.verification.chain_bab import chain_bab_verify
    order = sorted(gap.items(), key=lambda kv: -kv[1][1])
    for k, (d, (_, _, threshold, row)) in enumerate(order):
        if inst.left() <= 0.05:
            return None
        others = len(order) - k  # this one and those after it (not the open ones already tried)
        ds = torch.tensor([d])

        def check(flat: torch.Tensor, d=d):
            x = flat.view(1, *inst.info.model_shape)
            return x if inst.confirm(x, torch.tensor([d])) is not None else None
        out = chain_bab_verify(inst.network.net, inst.x64, None, row[None], inst.left() / max(others, 1),
                               check, threshold=threshold, batch=inst.cfg.bab_batch,
                               alpha_steps=inst.cfg.bab_alpha_steps, root_bounds=pre, box=inst.box64)
        if out.status == "verified":
            inst.open[d] = False
        elif out.status == "falsified" and out.counterexample is not None:
            cex = inst.confirm(out.counterexample.view(1, *inst.info.model_shape), ds)
            if cex is not None:
                return cex
    res.open_disjuncts["chain-bab"] = sum(inst.open)
    return None


# ---------------------------------------------------------------------------------------------------
# Entry points.

def verify_vnnlib(onnx_path: str | os.PathLike | OnnxNetwork, vnnlib_path: str | os.PathLike,
                  timeout: float | None = None, config: VerifyConfig | None = None, **options: Any) -> VerifyResult:
    """Decide the VNN-LIB property at ``vnnlib_path`` for the ONNX network ``onnx_path`` (files may be
    gzipped; a loaded :class:`OnnxNetwork` is reused as is). ``timeout`` (seconds, everything included)
    and the other :class:`VerifyConfig` fields as keyword ``options`` override ``config``.

    Returns a :class:`VerifyResult`: ``sat`` with a counterexample confirmed by onnxruntime, ``unsat``
    (proved, see the module docstring for the soundness policy), ``timeout`` or ``unknown`` (every stage
    ran without a verdict). Raises :class:`certdist.interop.OnnxImportError` on an unsupported network
    and ValueError on a property that does not fit it."""
    cfg = replace(config or VerifyConfig(), **({"timeout": float(timeout)} if timeout is not None else {}),
                  **options)
    start = time.monotonic()
    deadline = start + cfg.timeout
    network = onnx_path if isinstance(onnx_path, OnnxNetwork) else OnnxNetwork.load(onnx_path)
    prop = read_property(vnnlib_path)
    res = VerifyResult("unknown", "", 0.0)

    def done(result: str, stage: str, cex=None, message: str = "") -> VerifyResult:
        res.result, res.stage, res.counterexample, res.time_s = result, stage, cex, time.monotonic() - start
        res.message = message or res.message
        return res
    if not prop.disjuncts or bool((prop.lower > prop.upper).any()):
        return done("unsat", "parse", message="empty input box or no unsafe region")
    with exact_fp32():
        inst = _Instance(network, prop, cfg, deadline)
        gen = torch.Generator().manual_seed(cfg.seed)
        cex = inst.sample(cfg.samples, gen)
        if cex is not None:
            return done("sat", "sample", cex)
        cex = inst.pgd(cfg.pgd_restarts, cfg.pgd_steps, gen)
        if cex is not None:
            return done("sat", "pgd", cex)
        if inst.left() <= 0:
            return done("timeout", "pgd")
        pre, gap = _bound_stages(inst, res)
        if not any(inst.open):
            return done("unsat", [k for k in res.open_disjuncts][-1])
        if inst.left() <= 0:
            return done("timeout", list(res.open_disjuncts)[-1])
        cex = inst.pgd(cfg.late_restarts, cfg.pgd_steps * 2, gen)
        if cex is not None:
            return done("sat", "pgd", cex)
        if cfg.bab and inst.left() > 0:
            gap = {d: g for d, g in gap.items() if inst.open[d]}
            cex = _bab(inst, gap, pre, res)
            if cex is not None:
                return done("sat", "chain-bab", cex)
            if not any(inst.open):
                return done("unsat", "chain-bab")
        if inst.left() <= 0:
            return done("timeout", "chain-bab" if cfg.bab else "pgd", message=f"{sum(inst.open)} disjuncts open")
        return done("unknown", "chain-bab" if cfg.bab else "pgd", message=f"{sum(inst.open)} disjuncts open")


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    if not p.is_absolute():
        p = root / p
    if not p.exists() and Path(str(p) + ".gz").exists():  # benchmarks shipped gzipped
        p = Path(str(p) + ".gz")
    return p


def read_instances(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[Path, Path, float]]:
    """The rows ``(onnx, vnnlib, timeout)`` of a VNN-COMP ``instances.csv`` (paths relative to ``root``,
    by default the csv's folder; a missing file is looked for with ``.gz`` appended)."""
    root = Path(root) if root is not None else Path(path).parent
    rows = []
    text = read_maybe_gz(path).decode()
    for n, row in enumerate(csv.reader(text.splitlines())):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 3:
            raise ValueError(f"{path}: line {n + 1}: expected onnx,vnnlib,timeout, got {row}")
        rows.append((_resolve(row[0].strip(), root), _resolve(row[1].strip(), root), float(row[2])))
    return rows


def verify_instances(instances: str | os.PathLike, root: str | os.PathLike | None = None,
                     out: str | os.PathLike | None = None, config: VerifyConfig | None = None,
                     progress: bool = True, **options: Any) -> dict[str, Any]:
    """Run every instance of a VNN-COMP benchmark (``instances.csv``: ``onnx,vnnlib,timeout`` per line)
    with its own timeout. ``out``: a csv with one row per instance, ``onnx,vnnlib,result,time_s``,
    written as the instances finish. An instance whose network or property is refused is ``error`` (its
    message printed). Each ONNX file is read once. A ``timeout`` option replaces every row's timeout. Returns ``{"rows": [...], "counts": {result: n},
    "total_time_s": t}``; print it with :func:`format_instances_summary`."""
    items = read_instances(instances, root)
    fixed_timeout = options.pop("timeout", None)  # overrides every row's own timeout
    networks: dict[str, OnnxNetwork | Exception] = {}
    counts = {r: 0 for r in RESULTS}
    rows = []
    start = time.monotonic()
    f = None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        f = open(out, "w", newline="")
        writer = csv.writer(f)
        writer.writerow(["onnx", "vnnlib", "result", "time_s"])
    try:
        for k, (onnx_path, vnnlib_path, timeout) in enumerate(items):
            t0 = time.monotonic()
            message = ""
            try:
                key = str(onnx_path)
                if key not in networks:
                    try:
                        networks[key] = OnnxNetwork.load(onnx_path)
                    except Exception as e:  # refused once, reported for every instance of it
                        networks[key] = e
                net = networks[key]
                if isinstance(net, Exception):
                    raise net
                res = verify_vnnlib(net, vnnlib_path, timeout=fixed_timeout or timeout, config=config, **options)
                result, message = res.result, res.message
            except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as e:
                result, message = "error", f"{type(e).__name__}: {e}"
            elapsed = time.monotonic() - t0
            counts[result] += 1
            rows.append({"onnx": str(onnx_path), "vnnlib": str(vnnlib_path), "result": result,
                         "time_s": round(elapsed, 4), "message": message})
            if f is not None:
                writer.writerow([onnx_path, vnnlib_path, result, f"{elapsed:.4f}"])
                f.flush()
            if progress:
                extra = f"  ({message})" if result == "error" else ""
                print(f"[{k + 1}/{len(items)}] {Path(vnnlib_path).name}: {result} {elapsed:.2f} s{extra}",
                      file=sys.stderr, flush=True)
    finally:
        if f is not None:
            f.close()
    return {"rows": rows, "counts": counts, "total_time_s": time.monotonic() - start}


def format_instances_summary(summary: dict[str, Any]) -> str:
    """Counts per result and the total time of a :func:`verify_instances` run."""
    n = len(summary["rows"])
    lines = [f"instances: {n}"]
    lines += [f"  {r:<8}{c:>6}" for r, c in summary["counts"].items() if c or r != "error"]
    lines.append(f"total time: {summary['total_time_s']:.2f} s")
    return "\n".join(lines)


__all__ = ["OnnxNetwork", "RESULTS", "VerifyConfig", "VerifyResult", "format_instances_summary", "read_instances",
           "read_property", "verify_instances", "verify_vnnlib"]
