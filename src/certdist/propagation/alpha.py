"""alpha-CROWN (Xu et al. 2021): CROWN with the ReLU lower slopes optimised by projected gradient.

Every unstable ReLU's lower relaxation ``alpha z`` (``alpha`` in [0, 1]) is a free parameter, one per
neuron, per specification row and per sample (a separate set for the upper bound of ``C z``). Starting
from CROWN's adaptive slopes, Adam ascends the lower bound (descends the upper bound), alpha is clamped
back to [0, 1] after each step, and the best bound seen per sample and specification row is kept: the
result is never looser than CROWN with the same pre-activation bounds (which are computed once, by
``intermediate``, and then held fixed; or passed in by a branch-and-bound verifier through
``intermediate_bounds``, one :class:`Interval` per ReLU in forward order, see :mod:`certdist.propagation.crown`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from certdist.bounds import Interval
from certdist.propagation.ibp import check_bound_inputs
from certdist.propagation.crown import (DEFAULT_MAX_MEMORY, Chain, backward, default_spec, prepare_chain,
                                        relu_relaxation)
from certdist.propagation.crown.chain import _chunks, _slice_pre


def _clone(t):
    return None if t is None else t.clone()


def alpha_crown(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, y: torch.Tensor | None = None,
                iterations: int = 20, lr: float = 0.1, intermediate: str = "crown", ref: torch.Tensor | None = None,
                intermediate_bounds: Sequence[Interval | None] | None = None, bound_lower: bool = True,
                bound_upper: bool = True, lr_decay: float = 0.98, eps: float | None = None,
                return_intermediate: bool = False, max_memory: int = DEFAULT_MAX_MEMORY, batch_stats: bool = False,
                box: Interval | None = None, optimize_intermediate: bool = False):
    """alpha-CROWN bounds of ``C z`` over the threat model's box around ``x`` (or over ``box`` when given):
    an :class:`Interval` [B, S] (detached; a side not asked for is -inf / +inf).

    ``C`` / ``y`` as in :func:`certdist.propagation.crown.crown`; ``iterations`` Adam steps with learning
    rate ``lr`` (multiplied by ``lr_decay`` after each step). Works under ``torch.no_grad`` and
    ``torch.inference_mode``: the optimisation runs on copies of the inputs. A network with BatchNorm in
    training mode is refused unless ``batch_stats``, and so is an ``x`` outside the threat model's data
    range (:func:`~certdist.propagation.ibp.check_bound_inputs`).

    ``optimize_intermediate``: also optimise the pre-activation bounds (auto_LiRPA's "crown-optimized"
    intermediate bounds): every neuron that the starting bounds leave unstable is re-bounded by CROWN
    with its own slopes for every ReLU before it, optimised jointly with the output's slopes for the
    output bound, each bound intersected with the best seen so far (any slopes in [0, 1] give sound
    bounds, so every intersection is sound). Tighter on deep networks, where CROWN's intermediate bounds
    are loose; about ``iterations`` times the cost of one CROWN pass with all intermediate neurons. When its
    slopes would exceed ``max_memory`` it warns and optimises the output's slopes only.
    With ``return_intermediate`` the tightened bounds are returned."""
    check_bound_inputs(model, x, threat, batch_stats)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not (bound_lower or bound_upper):
        raise ValueError("at least one of bound_lower / bound_upper must be True")
    with torch.inference_mode(False):
        x, C, y, ref = _clone(x), _clone(C), _clone(y), _clone(ref)
        if intermediate_bounds is not None:
            intermediate_bounds = [None if g is None else Interval(g.lower.clone(), g.upper.clone())
                                   for g in intermediate_bounds]
        with torch.no_grad():
            chain, box, pre = prepare_chain(model, x, threat, ref, eps, intermediate, intermediate_bounds, max_memory,
                                            box)
            C = default_spec(x, chain.shapes[-1][0], C, y)
        if optimize_intermediate and _all_slopes_bytes(chain, pre, C) > max_memory:
            warnings.warn(f"alpha_crown: optimising the intermediate bounds needs ~{_all_slopes_bytes(chain, pre, C) >> 20} "
                          f"MiB of slopes, above max_memory ({max_memory >> 20} MiB); only the output's slopes are "
                          "optimised", RuntimeWarning, stacklevel=2)
            optimize_intermediate = False
        if optimize_intermediate:
            out, pre = _optimise_all(chain, box, pre, C, iterations, lr, lr_decay, bound_lower, bound_upper)
            if return_intermediate:
                return out, [pre[i] for i in chain.relus]
            return out
        lows, ups = [], []
        for bs in _chunks(x.shape[0], _samples_per_chunk(chain, C, bound_lower + bound_upper, max_memory)):
            out = _optimise(chain, Interval(box.lower[bs], box.upper[bs]), _slice_pre(pre, bs), C[bs],
                            iterations, lr, lr_decay, bound_lower, bound_upper)
            lows.append(out.lower)
            ups.append(out.upper)
        out = Interval(torch.cat(lows), torch.cat(ups))
    if return_intermediate:
        return out, [pre[i] for i in chain.relus]
    return out


def _samples_per_chunk(chain: Chain, C: torch.Tensor, sides: int, max_memory: int) -> int:
    S = C.shape[1]
    numel = [int(torch.Size(s).numel()) for s in chain.shapes]
    # backward matrices (with autograd's saved copies) + alphas with their gradient and Adam state
    per_sample = S * C.element_size() * sides * (6 * max(numel) + 4 * sum(numel[i] for i in chain.relus))
    return max(1, max_memory // max(1, per_sample))


def _slope_step(out: Interval, params: list[torch.Tensor], opt, sched, lower: bool, upper: bool) -> None:
    """One projected Adam step of the slopes on the bound ``out`` (up the lower, down the upper bound),
    clamped back to [0, 1]. A slope the bound does not depend on gets no gradient and is left as it is."""
    loss = (-out.lower.sum() if lower else 0) + (out.upper.sum() if upper else 0)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for a, g in zip(params, grads):
        a.grad = g
    opt.step()
    sched.step()
    with torch.no_grad():
        for a in params:
            a.clamp_(0.0, 1.0)


def _optimise(chain: Chain, box: Interval, pre: dict[int, Interval], C: torch.Tensor, iterations: int, lr: float,
              lr_decay: float, lower: bool, upper: bool) -> Interval:
    S = C.shape[1]
    alphas: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for i, p in pre.items():
        _, _, adaptive, unstable = relu_relaxation(p)
        if unstable.any():
            init = adaptive.unsqueeze(1).expand(-1, S, *adaptive.shape[1:])
            alphas[i] = tuple(init.clone().requires_grad_() if side else None for side in (lower, upper))
    params = [a for pair in alphas.values() for a in pair if a is not None]
    best_lo = torch.full(C.shape[:2], -float("inf"), dtype=C.dtype, device=C.device)
    best_up = torch.full(C.shape[:2], float("inf"), dtype=C.dtype, device=C.device)
    opt = torch.optim.Adam(params, lr=lr) if params else None
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay) if opt else None
    for step in range(iterations + 1):
        with torch.enable_grad():
            out = backward(chain, len(chain.layers), C, pre, lower, upper, alphas).concretize(box)
        best_lo = torch.maximum(best_lo, out.lower.detach())
        best_up = torch.minimum(best_up, out.upper.detach())
        if step == iterations or opt is None:
            break
        _slope_step(out, params, opt, sched, lower, upper)
    return Interval(best_lo, best_up)


def _intermediate_targets(chain: Chain, pre0: dict[int, Interval]) -> dict[int, torch.Tensor]:
    """Per ReLU after the first, the (flat) neurons unstable in ``pre0`` for some sample."""
    targets: dict[int, torch.Tensor] = {}
    for k, i in enumerate(chain.relus):
        if k == 0:
            continue  # the first ReLU's bounds come from affine maps of the box: CROWN's are exact
        _, _, _, unstable = relu_relaxation(pre0[i])
        idx = torch.nonzero(unstable.flatten(1).any(0)).flatten()
        if len(idx):
            targets[i] = idx
    return targets


def _all_slopes_bytes(chain: Chain, pre0: dict[int, Interval], C: torch.Tensor) -> int:
    """The memory of :func:`_optimise_all`'s slopes with their gradients and Adam state (x4), two sides,
    and of the widest backward pass of each intermediate specification (x6)."""
    B = C.shape[0]
    size = C.element_size()
    numel = {i: int(torch.Size(chain.shapes[i]).numel()) for i in chain.relus}
    widest = max(int(torch.Size(s).numel()) for s in chain.shapes)
    rows = {i: len(idx) for i, idx in _intermediate_targets(chain, pre0).items()}
    rows[len(chain.layers)] = C.shape[1]
    total = 0
    for end, r in rows.items():
        total += B * r * size * (2 * 4 * sum(n for j, n in numel.items() if j < end) + 6 * widest)
    return total


def _optimise_all(chain: Chain, box: Interval, pre0: dict[int, Interval], C: torch.Tensor, iterations: int,
                  lr: float, lr_decay: float, lower: bool, upper: bool) -> tuple[Interval, dict[int, Interval]]:
    """alpha-CROWN with optimised intermediate bounds (all samples at once): per ReLU ``i`` after the
    first, its neurons unstable in ``pre0`` get CROWN bounds with slopes of their own for every ReLU
    before ``i`` (``[B, n_unstable, *shape]`` per side); everything is optimised for the output bound.
    Returns the best output bounds and the best (tightest) intermediate bounds seen."""
    B = box.lower.shape[0]
    S = C.shape[1]
    dtype = box.lower.dtype
    best_pre = {i: Interval(p.lower.detach().clone(), p.upper.detach().clone()) for i, p in pre0.items()}
    # the neurons to re-bound at each ReLU: unstable in pre0 (any sample), as rows of a one-hot spec
    targets = _intermediate_targets(chain, pre0)
    alphas_of: dict[int, dict[int, tuple]] = {}  # start layer (ReLU index or "out") -> ReLU j -> (al, au)

    def init(rows: int, before: int, sides: tuple[bool, bool]) -> dict[int, tuple]:
        out = {}
        for j in chain.relus:
            if j >= before:
                break
            _, _, adaptive, unstable = relu_relaxation(pre0[j])
            if unstable.any():
                a = adaptive.unsqueeze(1).expand(-1, rows, *adaptive.shape[1:])
                out[j] = tuple(a.clone().requires_grad_() if side else None for side in sides)
        return out
    for i, idx in targets.items():
        alphas_of[i] = init(len(idx), i, (True, True))
    end = len(chain.layers)
    alphas_of[end] = init(S, end, (lower, upper))
    params = [a for d in alphas_of.values() for pair in d.values() for a in pair if a is not None]
    best_lo = torch.full(C.shape[:2], -float("inf"), dtype=dtype, device=C.device)
    best_up = torch.full(C.shape[:2], float("inf"), dtype=dtype, device=C.device)
    opt = torch.optim.Adam(params, lr=lr) if params else None
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay) if opt else None
    for step in range(iterations + 1):
        with torch.enable_grad():
            pre: dict[int, Interval] = {}
            for i in chain.relus:
                if i not in targets:
                    pre[i] = best_pre[i]
                    continue
                idx = targets[i]
                n = int(torch.Size(chain.shapes[i]).numel())
                spec = torch.nn.functional.one_hot(idx, n).to(dtype).view(1, len(idx), *chain.shapes[i])
                got = backward(chain, i, spec, pre, True, True, alphas_of[i]).concretize(box)
                lo = best_pre[i].lower.flatten(1).clone()
                up = best_pre[i].upper.flatten(1).clone()
                # intersect with the best bounds so far (gradient through the new bound where it is tighter)
                lo[:, idx] = torch.maximum(got.lower, lo[:, idx])
                up[:, idx] = torch.minimum(got.upper, up[:, idx])
                pre[i] = Interval(lo.view(B, *chain.shapes[i]), up.view(B, *chain.shapes[i]))
            out = backward(chain, end, C, pre, lower, upper, alphas_of[end]).concretize(box)
        with torch.no_grad():
            for i in targets:
                best_pre[i] = Interval(torch.maximum(best_pre[i].lower, pre[i].lower.detach()),
                                       torch.minimum(best_pre[i].upper, pre[i].upper.detach()))
        best_lo = torch.maximum(best_lo, out.lower.detach())
        best_up = torch.minimum(best_up, out.upper.detach())
        if step == iterations or opt is None:
            break
        _slope_step(out, params, opt, sched, lower, upper)
    return Interval(best_lo, best_up), best_pre
