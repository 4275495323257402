"""Complete verification by branch and bound on ReLU splits (BaBSR-style, Bunel et al. 2020).

Works on the dense chain of :mod:`certdist.verification.dense` in float64. A *domain* is the input
box together with pre-activation bounds in which some unstable ReLUs are fixed (``l = 0``: active,
``u = 0``: inactive). Each step pops the ``batch`` domains with the lowest bounds, splits each on the
neuron with the largest score, re-bounds all children at once (CROWN for the later layers'
pre-activations given the splits, when the backward matrices fit in ``MAX_REFINE_BYTES``; then, for
the margin, CROWN and ``alpha_steps`` of projected Adam on the lower slopes and on Lagrange multipliers
of the split constraints: alpha-beta-CROWN, Wang et al. 2021) and

- drops a child whose bound exceeds the row's float32 tolerance ``tol`` (the one acceptance rule of
  :func:`certdist.verification.rounding.proved`; a NaN bound proves nothing) or whose bounds are
  contradictory by more than rounding can explain (an empty domain, see :func:`_sanitize`: never the root,
  nor a domain whose split constraints the box centre satisfies; bounds crossed by less are repaired);
- evaluates the network at the minimiser of the child's linear bound; a point whose margin is below
  the tolerance and that the caller's ``check`` validates ends the search (falsified);
- solves a child with no unstable ReLU left exactly (an LP, :mod:`certdist.verification.milp`), which
  makes the search complete: every leaf is decided.

Branching score: ``|A_neg| * (-l u / (u - l))``, the loss of the triangle relaxation's upper intercept
weighted by the backward coefficient of the margin bound (the BaBSR intercept score); ties and zeros
are broken by ``-l u / (u - l)``.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from certdist.verification import milp
from certdist.verification.dense import DenseNet, backward_lower, crown_bounds
from certdist.verification.rounding import proved


MAX_REFINE_BYTES = 256 * 1024 ** 2


@dataclass
class BabResult:
    status: str                          # verified | falsified | unknown
    lower: float                         # proven lower bound of the smallest margin (-inf if unknown)
    counterexample: torch.Tensor | None = None
    domains: int = 0                     # domains bounded
    message: str = ""


class DomainBudget:
    """The effort budget of a branch-and-bound search: at most ``limit`` domains bounded, all margin rows
    together (None: no limit). Counting work instead of seconds makes the verdict machine-independent."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.spent = limit, 0

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - self.spent

    def pop_count(self, batch: int, queued: int) -> int:
        """How many domains to split next (each makes two children) within the budget."""
        return int(min(batch, queued, max(self.left() // 2, 0)))

    def next_batch(self, heap: list, batch: int, deadline: float, domains: int) -> tuple[BabResult | None, list]:
        """One step of a best-first search over ``heap`` (entries ``(lower bound, ...)``, the open domains):
        ``(unknown result, [])`` once the wall clock passes ``deadline`` or the budget is spent, else
        ``(None, the at most batch entries popped to split next)``. Both branch-and-bound searches (dense
        and chain) run on it."""
        if time.monotonic() > deadline:
            return BabResult("unknown", heap[0][0], None, domains, "time limit"), []
        n_pop = self.pop_count(batch, len(heap))
        if n_pop == 0:
            return BabResult("unknown", heap[0][0], None, domains, "domain budget"), []
        return None, [heapq.heappop(heap) for _ in range(n_pop)]


@dataclass
class _Domain:
    lbs: list[torch.Tensor]
    ubs: list[torch.Tensor]
    splits: list[torch.Tensor]           # +1: z >= 0, -1: z <= 0, 0: not split (int8, per layer)
    split: tuple[int, int] | None        # (layer, neuron) to branch on next


def _stack(domains: list[_Domain], attr: str) -> list[torch.Tensor]:
    return [torch.stack(ts) for ts in zip(*(getattr(d, attr) for d in domains))]


def _children(domains: list[_Domain]):
    """Two children per domain (active first, then inactive), stacked: [2D, n_k] per layer."""
    lbs, ubs, spl = (_stack(domains, a) for a in ("lbs", "ubs", "splits"))
    lbs, ubs, spl = ([torch.cat([t, t]) for t in ts] for ts in (lbs, ubs, spl))
    D = len(domains)
    for i, d in enumerate(domains):
        k, j = d.split
        lbs[k][i, j] = max(float(lbs[k][i, j]), 0.0)
        spl[k][i, j] = 1
        ubs[k][D + i, j] = min(float(ubs[k][D + i, j]), 0.0)
        spl[k][D + i, j] = -1
    return lbs, ubs, spl, min(d.split[0] for d in domains)


def _optimise(net: DenseNet, A: torch.Tensor, lbs, ubs, splits, x_lo, x_hi, steps: int, lr: float) -> torch.Tensor:
    """alpha-beta-CROWN: the best lower bound over ``steps`` of projected Adam on the unstable lower
    slopes (alpha in [0, 1]) and the split multipliers (beta >= 0)."""
    alphas = [(u > -l).to(l.dtype).unsqueeze(1).clone().requires_grad_(True) for l, u in zip(lbs, ubs)]
    signs = [-s.to(torch.float64).unsqueeze(1) for s in splits]
    raw = [torch.zeros_like(sg).requires_grad_(True) for sg in signs]
    opt = torch.optim.Adam(alphas + raw, lr=lr)
    best = None
    with torch.enable_grad():
        for _ in range(steps):
            betas = [r * sg for r, sg in zip(raw, signs)]
            low = backward_lower(net, net.num_relu_layers, A, lbs, ubs, x_lo, x_hi, alphas=alphas, betas=betas).lower
            best = low.detach() if best is None else torch.maximum(best, low.detach())
            opt.zero_grad()
            (-low.sum()).backward()
            opt.step()
            with torch.no_grad():
                for a in alphas:
                    a.clamp_(0, 1)
                for r in raw:
                    r.clamp_(min=0)
    return best


def _choose(scores: list[torch.Tensor], lbs, ubs) -> list[tuple[int, int] | None]:
    """(layer, neuron) with the largest branching score per domain; None when nothing is unstable."""
    flat, sizes = [], []
    for s, l, u in zip(scores, lbs, ubs):
        unstable = (l < 0) & (u > 0)
        tri = torch.where(unstable, -l * u / (u - l).clamp(min=1e-30), torch.zeros_like(l))
        flat.append(torch.where(unstable, s[:, 0] + 1e-4 * tri, torch.full_like(l, -1.0)))
        sizes.append(l.shape[1])
    allf = torch.cat(flat, 1)
    best, idx = allf.max(1)
    offsets = list(itertools.accumulate(sizes))
    out = []
    for b, i in zip(best.tolist(), idx.tolist()):
        if b < 0:
            out.append(None)
            continue
        k = next(n for n, off in enumerate(offsets) if i < off)
        out.append((k, i - (offsets[k - 1] if k else 0)))
    return out


EMPTY_REL_SLACK = 1e-9


def _magnitudes(net: DenseNet, x_lo: torch.Tensor, x_hi: torch.Tensor) -> list[torch.Tensor]:
    """Per ReLU layer k, ``M_k = |W_k| M_{k-1} + |b_k|`` from ``M_{-1} = max(|x_lo|, |x_hi|)`` (flat [n_k]):
    a bound on the absolute value of every term of every float64 bound of a layer-k neuron over the box
    (IBP's and CROWN's: ReLU slopes lie in [0, 1] and intercepts below the bounds' own magnitudes), so that
    their rounding errors are a small multiple of ``2^-53 M_k``."""
    m = torch.maximum(x_lo.abs(), x_hi.abs()).reshape(-1)
    out = []
    for W, b in zip(net.weights[:-1], net.biases[:-1]):
        m = W.abs() @ m + b.abs()
        out.append(m)
    return out


def _sanitize(lbs: list[torch.Tensor], ubs: list[torch.Tensor], splits: list[torch.Tensor],
              slack: list[torch.Tensor], witness: list[torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Crossed bounds (``l > u``) of a batch of domains ([D, n_k] per layer): ``(lbs, ubs, empty)``.

    A domain is empty (and may be dropped: it holds no input) only when some neuron's bounds cross by more
    than ``slack`` (a bound on what float64 rounding of two sound enclosures can explain, per neuron) and
    the ``witness`` (the pre-activations of a point of the box, per layer [n_k]) breaks one of its split
    constraints: a domain whose constraints a point of the box meets is never empty, in particular the
    root (no splits), which holds the clean input. Emptiness never proves anything else. Every other
    crossing is rounding: those bounds are repaired to ``[min(l, u), max(l, u)]`` and the domain is kept."""
    D = lbs[0].shape[0] if lbs else 0
    far = torch.zeros(D, dtype=torch.bool)
    met = torch.ones(D, dtype=torch.bool)
    out_l, out_u = [], []
    for l, u, s, e, w in zip(lbs, ubs, splits, slack, witness):
        far |= (l > u + e).any(1)
        met &= ~(((s > 0) & (w < -e)) | ((s < 0) & (w > e))).any(1)
        out_l.append(torch.minimum(l, u))
        out_u.append(torch.maximum(l, u))
    return out_l, out_u, far & ~met


class _RowSearch:
    """Branch and bound for one margin row ``c`` (``c^T logits > 0`` on the box)."""

    def __init__(self, net: DenseNet, c: torch.Tensor, x_lo, x_hi, check, batch: int, alpha_steps: int,
                 alpha_lr: float, deadline: float, tol: float = 0.0, budget: DomainBudget | None = None) -> None:
        self.net, self.c, self.x_lo, self.x_hi, self.check, self.tol = net, c, x_lo, x_hi, check, tol
        self.budget = budget or DomainBudget()
        self.batch, self.alpha_steps, self.alpha_lr, self.deadline = batch, alpha_steps, alpha_lr, deadline
        self.heap: list = []
        self.counter = itertools.count()
        self.domains = 0
        self.unresolved = 0
        self.leaf_message = ""
        self.counterexample: torch.Tensor | None = None
        self.proved = float("inf")  # smallest bound of a domain proved safe
        # what emptiness needs: the rounding slack per neuron and the box centre's pre-activations
        self._slack = [EMPTY_REL_SLACK * (k + 2) * m for k, m in enumerate(_magnitudes(net, x_lo, x_hi))]
        self._witness = [z[0] for z in net.preactivations((x_lo + x_hi) / 2)[:-1]]

    def _refine_bytes(self, D: int, start: int) -> int:
        """Memory of the largest backward matrix when re-bounding the layers from ``start`` on."""
        w = self.net.weights
        return max((D * 2 * w[k].shape[0] * max(v.shape[1] for v in w[:k + 1]) * 8
                    for k in range(start, self.net.num_relu_layers)), default=0)

    def bound(self, lbs, ubs, splits) -> tuple[torch.Tensor, torch.Tensor, list]:
        D = lbs[0].shape[0] if lbs else 1
        A = self.c.view(1, 1, -1).expand(D, 1, -1)
        lo, hi = self.x_lo.expand(D, -1), self.x_hi.expand(D, -1)
        res = backward_lower(self.net, self.net.num_relu_layers, A, lbs, ubs, lo, hi, want_scores=True)
        lower = res.lower[:, 0]
        if self.alpha_steps > 0 and lbs:
            lower = torch.maximum(lower, _optimise(self.net, A, lbs, ubs, splits, lo, hi, self.alpha_steps,
                                                   self.alpha_lr)[:, 0])
        self.domains += D
        self.budget.spent += D
        return lower, res.minimiser[:, 0], res.scores

    def try_points(self, xs: torch.Tensor) -> bool:
        """Validate the points whose margin in the dense network is below the tolerance (float32 may
        misclassify them); True on a counterexample."""
        margins = self.net.forward(xs) @ self.c
        for i in torch.argsort(margins).tolist():
            if not margins[i] < self.tol:
                break
            cex = self.check(xs[i])
            if cex is not None:
                self.counterexample = cex
                return True
        return False

    def leaf(self, lbs: list[torch.Tensor], ubs: list[torch.Tensor]) -> bool:
        """Decide a domain without unstable ReLUs by an LP; True on a counterexample."""
        form = milp.build(self.net, self.x_lo[0].numpy(), self.x_hi[0].numpy(), [l.numpy() for l in lbs],
                          [u.numpy() for u in ubs])
        row = milp.solve_row(form, self.net, self.c.numpy(), max(self.deadline - time.monotonic(), 1e-3),
                             tol=self.tol)
        if row.status == "verified":
            self.proved = min(self.proved, row.lower)
            return False
        if row.x is not None and self.try_points(torch.from_numpy(row.x).unsqueeze(0)):
            return True
        self.unresolved += 1  # a margin within the tolerance or a solver failure: cannot be decided
        self.leaf_message = self.leaf_message or row.message
        return False

    def sanitize(self, lbs, ubs, splits) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """:func:`_sanitize` with this box's slack and witness (the box centre's pre-activations)."""
        return _sanitize(lbs, ubs, splits, self._slack, self._witness)

    def process(self, lbs, ubs, splits, lower, minimisers, scores, empty) -> bool:
        """Prune, check and queue bounded domains (``empty``: from :meth:`sanitize`); True when a
        counterexample was found."""
        lower = torch.nan_to_num(lower, nan=-float("inf"))  # NaN proves nothing (and would break the heap)
        open_ = (~empty) & ~proved(lower, self.tol)
        if ((~empty) & ~open_).any():
            self.proved = min(self.proved, float(lower[(~empty) & ~open_].min()))
        if open_.any() and self.try_points(minimisers[open_]):
            return True
        choices = _choose(scores, lbs, ubs) if lbs else [None] * len(lower)
        for i in torch.nonzero(open_).flatten().tolist():
            dl, du, ds = [l[i] for l in lbs], [u[i] for u in ubs], [t[i] for t in splits]
            if choices[i] is None:
                if self.leaf(dl, du):
                    return True
                continue
            heapq.heappush(self.heap, (float(lower[i]), next(self.counter), _Domain(dl, du, ds, choices[i])))
        return False

    def run(self, lbs: list[torch.Tensor], ubs: list[torch.Tensor]) -> BabResult:
        root_l, root_u = [l.unsqueeze(0) for l in lbs], [u.unsqueeze(0) for u in ubs]
        root_s = [torch.zeros_like(l, dtype=torch.int8) for l in root_l]
        root_l, root_u, _ = self.sanitize(root_l, root_u, root_s)  # the root holds the clean input: never empty
        lower, mins, scores = self.bound(root_l, root_u, root_s)
        if self.process(root_l, root_u, root_s, lower, mins, scores, torch.zeros(1, dtype=torch.bool)):
            return BabResult("falsified", float(lower.min()), self.counterexample, self.domains)
        while self.heap:
            stop, entries = self.budget.next_batch(self.heap, self.batch, self.deadline, self.domains)
            if stop is not None:
                return stop
            popped = [e[2] for e in entries]
            c_l, c_u, c_s, first = _children(popped)
            D2 = c_l[0].shape[0]
            if self._refine_bytes(D2, first + 1) <= MAX_REFINE_BYTES:  # else keep the parents' bounds
                c_l, c_u = crown_bounds(self.net, self.x_lo.expand(D2, -1), self.x_hi.expand(D2, -1), c_l, c_u,
                                        splits=c_s, start=first + 1)
            c_l, c_u, empty = self.sanitize(c_l, c_u, c_s)
            lower, mins, scores = self.bound(c_l, c_u, c_s)
            if self.process(c_l, c_u, c_s, lower, mins, scores, empty):
                return BabResult("falsified", -float("inf"), self.counterexample, self.domains)
        if self.unresolved:
            why = f" ({self.leaf_message})" if self.leaf_message else ""
            return BabResult("unknown", -float("inf"), None, self.domains,
                             f"{self.unresolved} leaf domains with a margin within the float32 tolerance "
                             f"could not be decided{why}")
        return BabResult("verified", self.proved, None, self.domains)


def bab_verify(net: DenseNet, x_lo: torch.Tensor, x_hi: torch.Tensor, C: torch.Tensor, time_limit: float,
               check: Callable[[torch.Tensor], torch.Tensor | None], batch: int = 64, alpha_steps: int = 20,
               alpha_lr: float = 0.1, root_bounds: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
               tol: torch.Tensor | float = 0.0, max_domains: int | None = None) -> BabResult:
    """Decide ``C logits > tol`` on the box ``[x_lo, x_hi]`` (flat [n_0]; ``C``: [S, K]) row by row;
    ``tol`` ([S] or a number): the float32 tolerance of each row (:mod:`certdist.verification.rounding`).

    ``check(x)`` receives a candidate input (flat float64) and returns the validated counterexample or
    ``None``. ``root_bounds``: pre-activation bounds (flat [n_k] per ReLU layer), default dense CROWN.
    The returned ``lower`` is a proven lower bound of the smallest margin only when verified.
    ``max_domains``: the effort budget, domains bounded over all rows (None: until ``time_limit``)."""
    deadline = time.monotonic() + time_limit
    x_lo = x_lo.to(torch.float64).view(1, -1)
    x_hi = x_hi.to(torch.float64).view(1, -1)
    if root_bounds is None:
        lbs, ubs = crown_bounds(net, x_lo, x_hi)
        lbs, ubs = [l[0] for l in lbs], [u[0] for u in ubs]
    else:
        lbs, ubs = root_bounds
    if not all(bool(torch.isfinite(t).all()) for t in [x_lo, x_hi, *lbs, *ubs]):
        return BabResult("unknown", -float("inf"), message="non-finite input box or pre-activation bounds")
    tols = torch.as_tensor(tol, dtype=torch.float64).expand(C.shape[0]).tolist()
    budget = DomainBudget(max_domains)
    return combine_rows((_RowSearch(net, c, x_lo, x_hi, check, batch, alpha_steps, alpha_lr, deadline, t, budget)
                         .run(lbs, ubs) for c, t in zip(C.to(torch.float64), tols)), deadline, budget)


def combine_rows(rows: Iterable[BabResult], deadline: float, budget: DomainBudget | None = None) -> BabResult:
    """The verdict of a point from its rows' searches (run lazily, in order): falsified at the first
    falsified row; verified only when every row is; else unknown (stopping once the deadline passed or
    the domain ``budget`` is spent)."""
    result = BabResult("verified", float("inf"))
    for row in rows:
        result.domains += row.domains
        if row.status == "falsified":
            return BabResult("falsified", row.lower, row.counterexample, result.domains)
        result.lower = min(result.lower, row.lower)
        if row.status == "unknown":
            result.status, result.message = "unknown", row.message
            if time.monotonic() > deadline or (budget is not None and budget.left() <= 0):
                break
    return result
