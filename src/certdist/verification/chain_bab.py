"""Branch and bound on ReLU splits over the layer chain itself (no dense network).

The dense verifier (:mod:`certdist.verification.bab`) needs the network as float64 matrices, which
conv nets beyond DM-small do not fit. This one works on ``model.layers()`` through the propagation
engine (:mod:`certdist.propagation.crown`: convolutions stay convolutions, intermediate bounds go
through windows), in ``dtype`` (default float64, on a copy of the eval-mode model).

The root's pre-activation bounds are CROWN's for the neurons IBP leaves unstable, intersected with IBP
(``intermediate="best"``), or the caller's (``root_bounds``, e.g. the certify pipeline's full-CROWN
bounds, which it has computed already) intersected with IBP. A *domain* is the input box with
pre-activation bounds per ReLU in which some unstable neurons are split (``l = 0``: active, ``u = 0``:
inactive). Each step pops the ``batch`` domains with the lowest bounds, splits each on the neuron with
the largest BaBSR score (Bunel et al. 2020: the coefficient of the margin's backward bound on the ReLU
output times the chord's intercept ``-l u / (u - l)``, the relaxation error the split removes; ties
broken by the intercept), and bounds all children at once:

- the still-unstable neurons of the ReLUs after the child's split are re-bounded by CROWN given the splits
  and intersected with the parent's bounds (:func:`~certdist.propagation.crown.tighten_intermediate`, one
  call per split layer: a child split in the last ReLU needs none);
- the margin by CROWN (which also gives the branching scores and the minimiser of the linear bound)
  and by ``alpha_steps`` of alpha-beta-CROWN; the largest lower bound counts. Each child starts from its
  parent's slopes and split multipliers of the parent's best bound (as alpha-beta-CROWN does), projected
  onto their valid ranges; with that, fewer steps per domain suffice (on the DM-small CC-IBP net at
  eps 0.15 a hard point needs 271 domains, 5.9 s, with 10 steps; 319 domains, 9.4 s, with 20 steps from
  the adaptive slopes, and stays open with 10 steps from them).

Soundness rules: a domain is closed only when its lower bound is ``> threshold`` (NaN proves nothing;
``threshold`` lets the caller demand a float tolerance); the verdict is ``verified`` only when every
domain is closed. The minimiser of every open child's linear bound is evaluated, and a point with a
negative margin is passed to the caller's ``check`` (which re-checks it on the float32 eval-mode model);
only a validated point makes the verdict ``falsified``. A domain without unstable neurons whose bound
stays ``<= threshold`` (the relaxation is exact, but its minimiser breaks a split constraint) cannot be
decided here: the search goes on and the verdict ends ``unknown`` unless a counterexample turns up.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

from certdist.bounds import Interval, LinearBounds
from certdist.propagation.crown import (DEFAULT_MAX_MEMORY, Chain, backward_rule_for, prepare_chain, relu_relaxation,
                                        tighten_intermediate)
from certdist.verification.bab import BabResult, DomainBudget, combine_rows

Bounds = dict[int, Interval]  # pre-activation bounds by ReLU layer index, batch of domains first


def _backward(chain: Chain, box: Interval, pre: Bounds, c: torch.Tensor, alphas: dict | None = None,
              betas: dict | None = None, scores: dict | None = None) -> LinearBounds:
    """The lower linear bound of ``c . logits`` per domain over the box, with lower ReLU slopes
    ``alphas`` (``[D, 1, *shape]`` by ReLU layer index, default adaptive) and the split constraints
    ``s z >= 0`` added with multipliers ``betas`` (``beta * s`` [D, *shape], beta >= 0: the bound of
    ``c . logits - sum(beta s z)``, which is below ``c . logits`` on the domain; beta-CROWN). Fills
    ``scores`` (if given) with the BaBSR score of every neuron per ReLU ([D, n], -1 where stable)."""
    D = box.lower.shape[0]
    C = c.view(1, 1, -1).expand(D, 1, -1)
    lin = LinearBounds(C, C.new_zeros(D, 1), None, None)
    for i in range(len(chain.layers) - 1, -1, -1):
        m = chain.layers[i]
        if isinstance(m, nn.ReLU) and scores is not None:
            _, intercept, _, unstable = relu_relaxation(pre[i])
            loss = lin.lA[:, 0].clamp(max=0).abs() * intercept
            scores[i] = torch.where(unstable, loss + 1e-4 * intercept, torch.full_like(loss, -1.0)).flatten(1)
        a = None if alphas is None else alphas.get(i)
        lin = backward_rule_for(m)(m, lin, chain.context(i, pre.get(i), a, None))
        if betas is not None and i in betas:
            lin = LinearBounds(lin.lA - betas[i].unsqueeze(1), lin.lb, None, None)
    return lin


def _bound_domains(chain: Chain, box: Interval, pre: Bounds, splits: dict[int, torch.Tensor], c: torch.Tensor,
                   steps: int, lr: float, threshold: float, warm: tuple[dict, dict] | None = None,
                   deadline: float = math.inf
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[dict, dict]]:
    """Lower bound of ``c . logits`` per domain [D] (the best of CROWN and up to ``steps`` of projected Adam
    on the lower slopes and split multipliers, alpha-beta-CROWN, stopped early once every domain's bound
    is above ``threshold`` or once ``time.monotonic()`` passes ``deadline``), the minimiser of CROWN's
    linear bound over the box [D, *input], the BaBSR scores per ReLU, and the slopes and multipliers of
    each domain's best bound, ``(alphas, betas)`` by ReLU layer index (``[D, 1, *shape]``, ``[D, *shape]``).
    ``warm``: slopes and multipliers to start from (a parent's; projected onto [0, 1] and >= 0; the CROWN
    pass uses them too), else the adaptive slopes and zero multipliers."""
    warm_a, warm_b = warm if warm is not None else ({}, {})
    alphas, signs = {}, {}
    for i in chain.relus:
        _, _, adaptive, unstable = relu_relaxation(pre[i])
        if unstable.any():
            init = warm_a[i] if i in warm_a else adaptive.unsqueeze(1)
            alphas[i] = init.clone().clamp_(0, 1).requires_grad_(True)
        if (splits[i] != 0).any():
            signs[i] = splits[i].to(box.lower.dtype)
    raw = {i: (warm_b[i].clone().clamp_(min=0) if i in warm_b else torch.zeros_like(s)).requires_grad_(True)
           for i, s in signs.items()}
    scores: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        lin = _backward(chain, box, pre, c, alphas, {i: r * signs[i] for i, r in raw.items()}, scores=scores)
        best = lin.concretize(box).lower[:, 0]
        minimiser = torch.where(lin.lA[:, 0] >= 0, box.lower, box.upper)
    params = list(alphas.values()) + list(raw.values())
    kept = [p.detach().clone() for p in params]  # the slopes and multipliers of the best bound per domain
    if steps > 0 and params and not bool((best > threshold).all()):
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                betas = {i: r * signs[i] for i, r in raw.items()}
                low = _backward(chain, box, pre, c, alphas, betas).concretize(box).lower[:, 0]
                better = low.detach() > best  # False for NaN
                best = torch.maximum(best, low.detach())
                for k, p in zip(kept, params):
                    k[better] = p.detach()[better]
                if bool((best > threshold).all()) or time.monotonic() > deadline:
                    break
                opt.zero_grad()
                (-low.sum()).backward()
                opt.step()
                with torch.no_grad():
                    for a in alphas.values():
                        a.clamp_(0, 1)
                    for r in raw.values():
                        r.clamp_(min=0)
    state = (dict(zip(alphas, kept[:len(alphas)])), dict(zip(raw, kept[len(alphas):])))
    return best, minimiser, [scores[i] for i in chain.relus], state


class _RowSearch:
    """Branch and bound for one margin row ``c`` (``c . logits > threshold`` on the box)."""

    def __init__(self, net: nn.Module, chain: Chain, box: Interval, threat, c: torch.Tensor, check,
                 threshold: float, batch: int, alpha_steps: int, alpha_lr: float, deadline: float,
                 max_memory: int, budget: DomainBudget | None = None) -> None:
        self.budget = budget or DomainBudget()
        self.net, self.chain, self.box, self.threat, self.c, self.check = net, chain, box, threat, c, check
        self.threshold, self.batch, self.alpha_steps, self.alpha_lr = threshold, batch, alpha_steps, alpha_lr
        self.deadline, self.max_memory = deadline, max_memory
        self.heap: list = []
        self.counter = itertools.count()
        self.domains = 0
        self.undecided = 0
        self.proved = math.inf
        self.counterexample: torch.Tensor | None = None

    def _box(self, D: int) -> Interval:
        shape = (D, *self.box.lower.shape[1:])
        return Interval(self.box.lower.expand(shape), self.box.upper.expand(shape))

    def bound(self, pre: Bounds, splits: dict[int, torch.Tensor], warm=None) -> tuple:
        D = next(iter(pre.values())).lower.shape[0]
        self.domains += D
        self.budget.spent += D
        return _bound_domains(self.chain, self._box(D), pre, splits, self.c, self.alpha_steps, self.alpha_lr,
                              self.threshold, warm, self.deadline)

    def try_points(self, xs: torch.Tensor) -> bool:
        """Pass the points with a negative margin to ``check``; True on a validated counterexample."""
        with torch.no_grad():
            margins = self.net(xs) @ self.c
        for i in torch.argsort(margins).tolist():
            if not margins[i] < 0:
                break
            cex = self.check(xs[i].flatten())
            if cex is not None:
                self.counterexample = cex
                return True
        return False

    def process(self, pre: Bounds, splits: dict[int, torch.Tensor], lower, minimiser, scores, state) -> bool:
        """Close, check and queue bounded domains; True when a counterexample was found."""
        closed = lower > self.threshold  # False for NaN
        if closed.any():
            self.proved = min(self.proved, float(lower[closed].min()))
        open_ = ~closed
        if open_.any() and self.try_points(minimiser[open_]):
            return True
        best, idx = torch.cat(scores, 1).max(1)
        sizes = list(itertools.accumulate(s.shape[1] for s in scores))
        for d in torch.nonzero(open_).flatten().tolist():
            if not best[d] >= 0:  # no unstable neuron left: not decidable by the relaxation
                self.undecided += 1
                continue
            j = int(idx[d])
            k = next(n for n, off in enumerate(sizes) if j < off)
            split = (self.chain.relus[k], j - (sizes[k - 1] if k else 0))
            key = float(lower[d]) if not math.isnan(float(lower[d])) else -math.inf
            dom = ({i: Interval(v.lower[d].clone(), v.upper[d].clone()) for i, v in pre.items()},
                   {i: t[d].clone() for i, t in splits.items()},
                   tuple({i: t[d].clone() for i, t in part.items()} for part in state))
            heapq.heappush(self.heap, (key, next(self.counter), dom, split))
        return False

    def children(self, popped: list) -> tuple[Bounds, dict[int, torch.Tensor], list[int], tuple[dict, dict]]:
        """Two children per domain (active, then inactive), stacked; each child's split layer; the parents'
        slopes and multipliers for the children to start from."""
        D = len(popped)
        pre, splits = {}, {}
        for i in self.chain.relus:
            lo = torch.stack([dom[0][i].lower for _, _, dom, _ in popped] * 2)
            up = torch.stack([dom[0][i].upper for _, _, dom, _ in popped] * 2)
            sp = torch.stack([dom[1][i] for _, _, dom, _ in popped] * 2)
            for d, (_, _, _, (layer, j)) in enumerate(popped):
                if layer == i:
                    lo[d].view(-1)[j] = lo[d].view(-1)[j].clamp(min=0)
                    sp[d].view(-1)[j] = 1
                    up[D + d].view(-1)[j] = up[D + d].view(-1)[j].clamp(max=0)
                    sp[D + d].view(-1)[j] = -1
            pre[i], splits[i] = Interval(lo, up), sp
        fallback = (lambda dom, i: relu_relaxation(dom[0][i])[2].unsqueeze(0),  # adaptive slopes
                    lambda dom, i: dom[0][i].lower.new_zeros(dom[0][i].lower.shape))  # zero multipliers
        warm = tuple({i: torch.stack([dom[2][k].get(i) if i in dom[2][k] else fallback[k](dom, i)
                                      for _, _, dom, _ in popped] * 2)
                      for i in set().union(*(dom[2][k] for _, _, dom, _ in popped))} for k in range(2))
        return pre, splits, [split[0] for _, _, _, split in popped] * 2, warm

    def tighten(self, pre: Bounds, layers: list[int]) -> Bounds:
        """:func:`~certdist.propagation.crown.tighten_intermediate` of each child from the ReLU after its
        split layer ``layers[n]`` on (children split in the last ReLU keep their bounds), in one call per
        split layer."""
        out = {i: Interval(v.lower.clone(), v.upper.clone()) for i, v in pre.items()}
        for layer in sorted(set(layers)):
            if layer == self.chain.relus[-1]:
                continue
            rows = torch.tensor([n for n, l in enumerate(layers) if l == layer])
            sub = {i: Interval(v.lower[rows], v.upper[rows]) for i, v in pre.items()}
            new = tighten_intermediate(self.chain, self._box(len(rows)), sub, layer + 1, self.max_memory)
            for i in self.chain.relus:
                if i > layer:
                    out[i].lower[rows], out[i].upper[rows] = new[i].lower, new[i].upper
        return out

    def run(self, root: Bounds) -> BabResult:
        splits = {i: torch.zeros(v.lower.shape, dtype=torch.int8, device=v.lower.device) for i, v in root.items()}
        if self.process(root, splits, *self.bound(root, splits)):
            return BabResult("falsified", -math.inf, self.counterexample, self.domains)
        while self.heap:
            stop, popped = self.budget.next_batch(self.heap, self.batch, self.deadline, self.domains)
            if stop is not None:
                return stop
            pre, splits, layers, warm = self.children(popped)
            with torch.no_grad():
                pre = self.tighten(pre, layers)
            if self.process(pre, splits, *self.bound(pre, splits, warm)):
                return BabResult("falsified", -math.inf, self.counterexample, self.domains)
        if self.undecided:
            return BabResult("unknown", -math.inf, None, self.domains,
                             f"{self.undecided} domains without unstable ReLUs stayed at bound <= {self.threshold}")
        return BabResult("verified", self.proved, None, self.domains)


def _intersect(chain: Chain, pre: Bounds, given: Sequence[Interval], dtype: torch.dtype) -> Bounds:
    """``pre`` intersected with the caller's bounds ``given`` (one per ReLU, checked for shape)."""
    given = list(given)
    if len(given) != len(chain.relus):
        raise ValueError(f"root_bounds must have one Interval per ReLU ({len(chain.relus)}), got {len(given)}")
    out = {}
    for i, g in zip(chain.relus, given):
        if g.lower.shape != pre[i].lower.shape or g.upper.shape != pre[i].upper.shape:
            raise ValueError(f"root_bounds of the ReLU at layer {i} have shape {tuple(g.lower.shape)}, "
                             f"expected {tuple(pre[i].lower.shape)}")
        # fmax/fmin: a NaN in the given bounds (overflow) falls back to IBP
        out[i] = Interval(torch.fmax(pre[i].lower, g.lower.to(dtype)),
                          torch.fmin(pre[i].upper, g.upper.to(dtype)))
    return out


def chain_bab_verify(model: nn.Module, x: torch.Tensor, threat, C: torch.Tensor, time_limit: float,
                     check: Callable[[torch.Tensor], torch.Tensor | None], threshold: float = 0.0,
                     batch: int = 32, alpha_steps: int = 10, alpha_lr: float = 0.1,
                     dtype: torch.dtype = torch.float64, max_memory: int = DEFAULT_MAX_MEMORY,
                     root_bounds: Sequence[Interval] | None = None, max_domains: int | None = None,
                     box: Interval | None = None) -> BabResult:
    """Decide ``C logits > threshold`` on the threat box around ``x`` [1, ...] (``C``: [S, K]), or on ``box``
    when given, row by row.

    ``check(flat point)`` receives a candidate input (flat, ``dtype``) and returns the validated
    counterexample or ``None``. The returned ``lower`` is a proven lower bound of the smallest margin
    only when verified. ``root_bounds``: valid pre-activation bounds over the same box, one
    :class:`Interval` [1, *shape] per ReLU in forward order (as ``crown(..., return_intermediate=True)``
    returns them); they replace the root's CROWN pass and are intersected with IBP. ``max_domains``: the
    effort budget, domains bounded over all rows (None: until ``time_limit``)."""
    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(f"x must hold one point with a batch dimension of 1, got shape {tuple(x.shape)}")
    if C.dim() != 2:
        raise ValueError(f"C must have shape [S, K], got {tuple(C.shape)}")
    if batch < 1 or alpha_steps < 0 or time_limit <= 0:
        raise ValueError(f"need batch >= 1, alpha_steps >= 0, time_limit > 0; got {batch}, {alpha_steps}, "
                         f"{time_limit}")
    deadline = time.monotonic() + time_limit
    net = copy.deepcopy(model).eval().to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    x = x.to(dtype)
    with torch.no_grad():
        if root_bounds is None:
            chain, box, pre = prepare_chain(net, x, threat, None, None, "best", None, max_memory, box)
        else:
            chain, box, pre = prepare_chain(net, x, threat, None, None, "ibp", None, max_memory, box)
            pre = _intersect(chain, pre, root_bounds, dtype)
    budget = DomainBudget(max_domains)
    return combine_rows((_RowSearch(net, chain, box, threat, c, check, threshold, batch, alpha_steps, alpha_lr,
                                    deadline, max_memory, budget).run(pre) for c in C.to(dtype)), deadline, budget)
