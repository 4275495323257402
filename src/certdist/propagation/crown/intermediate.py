"""Intermediate (pre-activation) bounds of every ReLU: IBP, CROWN neuron by neuron (dense one-hot
specifications or the windows of :mod:`certdist.propagation.crown.patches`), or "best" (CROWN where IBP
leaves neurons unstable, intersected with IBP)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval
from certdist.models.layers import Normalize
from certdist.propagation.crown.chain import DEFAULT_MAX_MEMORY, INTERMEDIATE_MODES, Chain, bound_spec
from certdist.propagation.crown.patches import _crown_neurons_patches, _patchable
from certdist.propagation.crown.rules import relu_relaxation
from certdist.propagation.ibp import rule_for


# ---------------------------------------------------------------------------------------------------
# Intermediate (pre-activation) bounds.

_DIAGONAL = (Normalize, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten)


def _ibp_exact(layers: Sequence[nn.Module]) -> bool:
    """IBP is the exact range of a chain with at most one mixing layer and otherwise diagonal maps."""
    return all(isinstance(m, _DIAGONAL + (nn.Linear, nn.Conv2d, nn.AvgPool2d)) for m in layers) and \
        sum(not isinstance(m, _DIAGONAL) for m in layers) <= 1


def _ibp_step(chain: Chain, i: int, box: Interval) -> Interval:
    m = chain.layers[i]
    out, _ = rule_for(m)(m, box, chain.refs[i])
    return out


def _crown_neurons(chain: Chain, end: int, box: Interval, pre: dict[int, Interval], select: torch.Tensor | None,
                   max_memory: int) -> Interval | None:
    """CROWN bounds of the neurons of ``layers[:end]``'s output, flattened to [B, n]: all of them, or
    only those in the boolean mask ``select`` [B, n] (others: +-inf). ``None`` if nothing is selected.
    Feature maps of convolutional chains go through windows (:func:`_crown_neurons_patches`), the rest
    through dense one-hot specifications (:func:`_crown_neurons_dense`)."""
    if _patchable(chain, end):
        return _crown_neurons_patches(chain, end, box, pre, select, max_memory)
    return _crown_neurons_dense(chain, end, box, pre, select, max_memory)


def _crown_neurons_dense(chain: Chain, end: int, box: Interval, pre: dict[int, Interval],
                         select: torch.Tensor | None, max_memory: int) -> Interval | None:
    """:func:`_crown_neurons` with one dense one-hot specification row per neuron."""
    B = box.lower.shape[0]
    shape = chain.shapes[end]
    n = int(torch.Size(shape).numel())
    dtype, device = box.lower.dtype, box.lower.device
    if select is None:
        def spec(bs, ss):  # the same rows for every sample: batch 1, broadcast by the first ReLU
            rows = torch.arange(ss.start, ss.stop, device=device)
            return F.one_hot(rows, n).to(dtype).view(1, len(rows), *shape)
        out = bound_spec(chain, end, spec, n, box, pre, max_memory=max_memory)
        return Interval(out.lower, out.upper)
    count = select.sum(1)
    S = int(count.max()) if B else 0
    if S == 0:
        return None
    # indices of the selected neurons first, padded with unselected ones (masked out below)
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :S]
    valid = torch.arange(S, device=device).unsqueeze(0) < count.unsqueeze(1)

    def spec(bs, ss):
        idx = order[bs, ss]
        return (F.one_hot(idx, n).to(dtype) * valid[bs, ss].unsqueeze(-1).to(dtype)).view(*idx.shape, *shape)

    out = bound_spec(chain, end, spec, S, box, pre, max_memory=max_memory)
    inf = torch.full((B, n), float("inf"), dtype=dtype, device=device)
    lo = (-inf).scatter(1, order, torch.where(valid, out.lower, -inf[:, :S]))
    up = inf.scatter(1, order, torch.where(valid, out.upper, inf[:, :S]))
    return Interval(lo, up)


def intermediate_bounds_of(chain: Chain, box: Interval, mode: str = "ibp",
                           given: Sequence[Interval | None] | None = None,
                           max_memory: int = DEFAULT_MAX_MEMORY) -> dict[int, Interval]:
    """Pre-activation bounds for every ReLU (keyed by layer index), in forward order."""
    if mode not in INTERMEDIATE_MODES:
        raise ValueError(f"unknown intermediate mode {mode!r}; known: {', '.join(INTERMEDIATE_MODES)}")
    given = _check_given(chain, box, given)
    pre: dict[int, Interval] = {}
    cur = box  # IBP interval of the current layer's input
    for i in range(len(chain.layers)):
        if i in chain.relus:
            k = chain.relus.index(i)
            if given[k] is not None:
                cur = given[k]
            elif mode == "crown" and not _ibp_exact(chain.layers[:i]):
                cur = _reshape(_crown_neurons(chain, i, box, pre, None, max_memory), chain.shapes[i])
            elif mode == "best" and not _ibp_exact(chain.layers[:i]):
                _, _, _, unstable = relu_relaxation(cur)
                crown = _crown_neurons(chain, i, box, pre, unstable.flatten(1), max_memory)
                if crown is not None:
                    crown = _reshape(crown, chain.shapes[i])
                    cur = Interval(torch.maximum(cur.lower, crown.lower), torch.minimum(cur.upper, crown.upper))
            pre[i] = cur
        cur = _ibp_step(chain, i, cur)
    return pre


def tighten_intermediate(chain: Chain, box: Interval, pre: dict[int, Interval], start: int = 0,
                         max_memory: int = DEFAULT_MAX_MEMORY) -> dict[int, Interval]:
    """Re-bound by CROWN the neurons that ``pre`` leaves unstable in every ReLU at layer index ``>= start``
    and intersect with ``pre``, ReLU after ReLU (each one uses the tightened bounds of those before it).

    ``pre`` may hold split neurons (``l = 0``: active, ``u = 0``: inactive, as branch and bound passes
    them): the result then holds where the split constraints hold, like ``pre`` itself. Neurons stable
    in ``pre`` keep their bounds (their relaxation is exact already)."""
    out = dict(pre)
    for i in chain.relus:
        if i < start or _ibp_exact(chain.layers[:i]):
            continue
        _, _, _, unstable = relu_relaxation(out[i])
        new = _crown_neurons(chain, i, box, out, unstable.flatten(1), max_memory)
        if new is not None:
            new = _reshape(new, chain.shapes[i])
            out[i] = Interval(torch.maximum(out[i].lower, new.lower), torch.minimum(out[i].upper, new.upper))
    return out


def _reshape(iv: Interval, shape: tuple[int, ...]) -> Interval:
    return Interval(iv.lower.view(-1, *shape), iv.upper.view(-1, *shape))


def _check_given(chain: Chain, box: Interval, given) -> list[Interval | None]:
    n = len(chain.relus)
    if given is None:
        return [None] * n
    given = list(given)
    if len(given) != n:
        raise ValueError(f"intermediate_bounds must have one entry per ReLU ({n}), got {len(given)}")
    B = box.lower.shape[0]
    for k, (i, g) in enumerate(zip(chain.relus, given)):
        if g is not None and tuple(g.lower.shape) != (B, *chain.shapes[i]):
            raise ValueError(f"intermediate_bounds[{k}] has shape {tuple(g.lower.shape)}, expected "
                             f"{(B, *chain.shapes[i])} (pre-activation of ReLU {k} = layer {i})")
    return given
