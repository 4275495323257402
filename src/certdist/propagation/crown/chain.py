"""The network as a chain (:class:`Chain`: layers, shapes, BatchNorm affine maps, ReLU positions) and the
backward passes over it: :func:`backward` (linear bounds of a specification) and :func:`bound_spec`
(concrete bounds, chunked under a memory budget)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from certdist.bounds import Interval, LinearBounds
from certdist.models.cnn import flat_layers
from certdist.propagation.crown.rules import LayerContext, backward_rule_for
from certdist.propagation.ibp import batchnorm_affine, needs_ref


INTERMEDIATE_MODES = ("ibp", "crown", "best")
DEFAULT_MAX_MEMORY = 2 * 1024 ** 3


# ---------------------------------------------------------------------------------------------------
# The network as a chain with shapes and BatchNorm affine maps.

@dataclass(frozen=True)
class Chain:
    """``layers`` with the per-sample input shape of every layer (``shapes[i]``; ``shapes[-1]`` is the
    output shape), BatchNorm ``(scale, shift)`` by layer index, and the indices of the ReLUs."""

    layers: tuple[nn.Module, ...]
    shapes: tuple[tuple[int, ...], ...]
    affine: dict[int, tuple[torch.Tensor, torch.Tensor]]
    relus: tuple[int, ...]
    refs: tuple[torch.Tensor | None, ...]  # clean input of each layer where train-mode BN needs it

    def context(self, i: int, pre: Interval | None = None, alpha_l=None, alpha_u=None) -> LayerContext:
        return LayerContext(self.shapes[i], self.affine.get(i), pre, alpha_l, alpha_u)


def layers_of(model) -> list[nn.Module]:
    """The layer chain of a CertifiableNet or an ``nn.Sequential`` (nested blocks flattened)."""
    return flat_layers(model)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def build_chain(model, x: torch.Tensor, ref: torch.Tensor | None = None) -> Chain:
    """Walk the clean batch through the layers once to record shapes and BatchNorm statistics
    (train-mode BatchNorm: the statistics of ``ref``, default ``x``; eval mode: running statistics)."""
    layers = layers_of(model)
    for m in layers:
        backward_rule_for(m)  # fail before any work on an unknown layer
    train_bn = needs_ref(layers)
    a = (x if ref is None else ref) if train_bn else x[:1]
    shapes, affine, refs = [], {}, []
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_bn):
        for i, m in enumerate(layers):
            shapes.append(tuple(a.shape[1:]))
            refs.append(a if train_bn and _is_bn(m) else None)
            if _is_bn(m):
                scale, shift = affine[i] = batchnorm_affine(m, a if train_bn else None)
                view = [1, -1] + [1] * (a.dim() - 2)
                a = a * scale.view(view) + shift.view(view)
            else:
                a = m(a)
    shapes.append(tuple(a.shape[1:]))
    if not train_bn:  # eval mode: recompute outside no_grad so gradients reach the BN parameters
        affine = {i: batchnorm_affine(layers[i], None) for i in affine}
    relus = tuple(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))
    return Chain(tuple(layers), tuple(shapes), affine, relus, tuple(refs))


# ---------------------------------------------------------------------------------------------------
# Backward passes.

def backward(chain: Chain, end: int, C: torch.Tensor, pre: dict[int, Interval], lower: bool = True,
             upper: bool = True, alphas: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
             ) -> LinearBounds:
    """Linear bounds of ``C . (output of layers[:end])`` in terms of the network input.

    ``C``: [b, s, *shapes[end]], or [1, s, ...] for the same rows for every sample (broadcast at the
    first ReLU: the affine layers above it then run once for all samples). ``pre``: ReLU pre-activation
    bounds by layer index, sliced to the same ``b`` samples. ``alphas``: optional ``(alpha_l, alpha_u)``
    lower slopes by ReLU layer index."""
    zero = C.new_zeros(C.shape[:2])
    lin = LinearBounds(C if lower else None, zero if lower else None, C if upper else None, zero if upper else None)
    alphas = alphas or {}
    for i in range(end - 1, -1, -1):
        m = chain.layers[i]
        a_l, a_u = alphas.get(i, (None, None))
        lin = backward_rule_for(m)(m, lin, chain.context(i, pre.get(i), a_l, a_u))
    return lin


def _slice_pre(pre: dict[int, Interval], rows: slice) -> dict[int, Interval]:
    return {i: Interval(v.lower[rows], v.upper[rows]) for i, v in pre.items()}


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


CPU_TENSOR_BYTES = 16 * 1024 ** 2


def _chunk_budget(max_memory: int, device: torch.device, tensors: int) -> int:
    """The bytes one chunk of ``tensors`` backward tensors may take. On the CPU without autograd also at
    most ``CPU_TENSOR_BYTES`` per tensor: larger tensors are fresh ``mmap``s that page-fault on every
    elementwise operation (several times slower per element than cache-sized, reused ones). With
    autograd (training) every chunk's tensors are kept for the backward pass anyway: no extra cut."""
    if device.type != "cpu" or torch.is_grad_enabled():
        return max_memory
    return min(max_memory, CPU_TENSOR_BYTES * tensors)


def bound_spec(chain: Chain, end: int, spec: Callable[[slice, slice], torch.Tensor], num_specs: int,
               box: Interval, pre: dict[int, Interval], lower: bool = True, upper: bool = True,
               max_memory: int = DEFAULT_MAX_MEMORY) -> Interval:
    """Concrete bounds of ``num_specs`` linear functions of the output of ``layers[:end]``, built by
    ``spec(samples, rows) -> [b, s, *shapes[end]]`` chunk by chunk under ``max_memory`` bytes."""
    B = box.lower.shape[0]
    widest = max(int(torch.Size(s).numel()) for s in chain.shapes[:end + 1])
    tensors = 4 * (int(lower) + int(upper))
    per_row = widest * box.lower.element_size() * tensors
    max_memory = _chunk_budget(max_memory, box.lower.device, tensors)
    s_size = max(1, min(num_specs, max_memory // max(1, B * per_row)))
    b_size = B if s_size * B * per_row <= max_memory else max(1, max_memory // (s_size * per_row))
    lows, ups = [], []
    for bs in _chunks(B, b_size):
        sub_box, sub_pre = Interval(box.lower[bs], box.upper[bs]), _slice_pre(pre, bs)
        lo_parts, up_parts = [], []
        for ss in _chunks(num_specs, s_size):
            out = backward(chain, end, spec(bs, ss), sub_pre, lower, upper).concretize(sub_box)
            lo_parts.append(out.lower)
            up_parts.append(out.upper)
        lows.append(torch.cat(lo_parts, 1))
        ups.append(torch.cat(up_parts, 1))
    return Interval(torch.cat(lows), torch.cat(ups))
