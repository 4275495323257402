"""Backward linear bound propagation: CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

A specification ``C z`` of the network's output ``z`` is bounded by two linear functions of the input,
``lA x + lb <= C z <= uA x + ub``, built by walking ``model.layers()`` backwards with one rule per layer
type (:data:`CROWN_RULES`), then concretised over the threat model's box (``threat.box(x)``).

ReLU relaxation, for pre-activation bounds ``l < 0 < u`` ("unstable"): upper bound the chord
``u (z - l) / (u - l)``; lower bound ``alpha z`` with ``alpha`` in [0, 1], by default the adaptive slope
(1 if ``u > -l`` else 0), or given per neuron and specification row (alpha-CROWN, see ``alpha.py``).
Stable neurons (``l >= 0`` or ``u <= 0``) are exact.

Pre-activation ("intermediate") bounds, one :class:`Interval` per ReLU, **in the order the ReLUs appear
in ``model.layers()``** (forward order), each of shape ``[B, *activation shape]``, come from:

- ``"ibp"``: interval bound propagation (CROWN-IBP);
- ``"crown"``: CROWN run backwards from every pre-activation layer, neuron by neuron (full CROWN, the
  semantics of auto_LiRPA's ``method="CROWN"``);
- ``"best"``: CROWN for the neurons IBP cannot prove stable, intersected with IBP; IBP is restarted from
  the intersected bounds at every ReLU. Never looser than either, and cheaper than ``"crown"``.

``intermediate_bounds`` (for branch and bound) overrides any entry that is not ``None``: a split
neuron is passed as ``l = 0`` (active) or ``u = 0`` (inactive); the returned bounds then hold over the
part of the box where the split constraints hold. Missing entries are computed from the given ones.

BatchNorm in training mode uses the statistics of the clean batch ``ref`` (default: ``x``), exactly as
:func:`certdist.propagation.ibp.ibp` does. Memory: the backward matrices are processed in chunks of
specification rows and samples so that they stay under ``max_memory`` bytes (an estimate: autograd
graphs kept for training come on top). On CUDA, cuDNN convolutions use TF32 unless
``torch.backends.cudnn.allow_tf32 = False``: turn it off when the bounds are used to certify.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval, LinearBounds
from certdist.models.cnn import flat_layers
from certdist.models.layers import Normalize
from certdist.models.support import check_supported
from certdist.propagation.ibp import batchnorm_affine, check_bound_inputs, needs_ref, rule_for
from certdist.specs import margin_matrix

INTERMEDIATE_MODES = ("ibp", "crown", "best")
DEFAULT_MAX_MEMORY = 2 * 1024 ** 3


@dataclass(frozen=True)
class LayerContext:
    """What a backward rule may need about its layer besides the module itself.

    ``in_shape``: the per-sample shape of the layer's input. ``affine``: BatchNorm's per-channel
    ``(scale, shift)``. ``pre``: ReLU pre-activation bounds ``[b, *in_shape]``. ``alpha_l`` /
    ``alpha_u``: ReLU lower slopes ``[b, s, *in_shape]`` for the lower / upper bound pass (``None``:
    adaptive)."""

    in_shape: tuple[int, ...]
    affine: tuple[torch.Tensor, torch.Tensor] | None = None
    pre: Interval | None = None
    alpha_l: torch.Tensor | None = None
    alpha_u: torch.Tensor | None = None


BackwardRule = Callable[[nn.Module, LinearBounds, LayerContext], LinearBounds]
CROWN_RULES: dict[type, BackwardRule] = {}


def register(*types: type) -> Callable[[BackwardRule], BackwardRule]:
    def deco(fn: BackwardRule) -> BackwardRule:
        for t in types:
            CROWN_RULES[t] = fn
        return fn
    return deco


def backward_rule_for(module: nn.Module) -> BackwardRule:
    rule = CROWN_RULES.get(type(module))
    if rule is None:
        known = ", ".join(sorted(t.__name__ for t in CROWN_RULES))
        raise TypeError(f"no CROWN rule for layer {type(module).__name__}; supported layers: {known}")
    return rule


# ---------------------------------------------------------------------------------------------------
# Layer rules. ``A`` has shape [b, s, *out_shape]; every affine rule maps it to [b, s, *in_shape] and
# adds ``A . const`` to the biases.

def _affine_rule(lin: LinearBounds, back: Callable[[torch.Tensor], torch.Tensor],
                 bias: Callable[[torch.Tensor], torch.Tensor] | None) -> LinearBounds:
    def side(A, b):
        if A is None:
            return None, None
        return back(A), (b if bias is None else b + bias(A))
    lA, lb = side(lin.lA, lin.lb)
    if lin.uA is lin.lA and lin.ub is lin.lb:  # both sides still equal (no ReLU yet): compute once
        return LinearBounds(lA, lb, lA, lb)
    uA, ub = side(lin.uA, lin.ub)
    return LinearBounds(lA, lb, uA, ub)


def _channel_view(v: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against [b, s, *in_shape]."""
    return v.reshape(-1, *([1] * (len(in_shape) - 1)))


def _channel_dot(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum(A * v)`` over the non-(b, s) dimensions for a per-channel vector ``v``: [b, s]."""
    if A.dim() > 3:
        A = A.flatten(3).sum(-1)
    return A @ v


def _dot(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum(A[b, s] * v[b])`` over the non-(b, s) dimensions, ``v``: [b, *in]: [b, s]."""
    return (A.flatten(2) @ v.flatten(1).unsqueeze(-1)).squeeze(-1)


def _linear_bias(A: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sum(A * bias)`` over every non-(b, s) dimension: [b, s]. On an input with more than one
    per-sample dimension ([N, C, H, W], [N, L, D]) ``nn.Linear`` acts on the last one and adds its bias
    at every leading position, so the bias term sums over those positions too."""
    if A.dim() > 3:
        A = A.flatten(2, -2).sum(2)  # [b, s, out]: the coefficients summed over the positions
    return A @ bias


@register(nn.Linear)
def _linear(m: nn.Linear, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    bias = None if m.bias is None else (lambda A: _linear_bias(A, m.bias))
    return _affine_rule(lin, lambda A: A @ m.weight, bias)


def _output_padding(m: nn.Module, in_hw: Sequence[int], out_hw: Sequence[int], kernel, stride, padding,
                    dilation) -> tuple[int, int]:
    """The ``output_padding`` that makes ``conv_transpose2d`` return the original input size."""
    op = []
    for i in range(2):
        full = (out_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1
        op.append(in_hw[i] - full)
        if not 0 <= op[i] < max(stride[i], dilation[i]):
            raise ValueError(f"cannot invert the shape of {m}: input {tuple(in_hw)}, output {tuple(out_hw)}")
    return op[0], op[1]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _fast_layout(t: torch.Tensor) -> torch.Tensor:
    """The input layout for a CPU transposed convolution: channels-last in float64 (the verifier's
    dtype), where it runs 5-15 % faster on wide layers; as is in float32 (training), where the layout
    copies cost more than they save: torch 2.13, 1 thread, the CROWN-IBP training step on DM-small is
    22 % faster without them and on CNN7 unchanged."""
    if t.device.type == "cpu" and t.dtype == torch.float64:
        return t.contiguous(memory_format=torch.channels_last)
    return t


@register(nn.Conv2d)
def _conv(m: nn.Conv2d, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError(f"Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r} is not supported "
                        "(only numeric zero padding)")

    def back(A):
        b, s = A.shape[:2]
        flat = A.reshape(b * s, *A.shape[2:])
        op = _output_padding(m, ctx.in_shape[1:], flat.shape[2:], m.kernel_size, m.stride, m.padding, m.dilation)
        out = F.conv_transpose2d(_fast_layout(flat), m.weight, None, m.stride, m.padding, op, m.groups, m.dilation)
        return out.contiguous().view(b, s, *ctx.in_shape)

    bias = None if m.bias is None else (lambda A: A.sum((-1, -2)) @ m.bias)
    return _affine_rule(lin, back, bias)


@register(nn.AvgPool2d)
def _avgpool(m: nn.AvgPool2d, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    k, st, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and any(p)):
        raise TypeError(f"{m} is not supported (ceil_mode, divisor_override, count_include_pad=False with padding)")
    channels = ctx.in_shape[0]

    def back(A):
        b, s = A.shape[:2]
        flat = A.reshape(b * s, *A.shape[2:])
        w = torch.full((channels, 1, *k), 1.0 / (k[0] * k[1]), dtype=A.dtype, device=A.device)
        op = _output_padding(m, ctx.in_shape[1:], flat.shape[2:], k, st, p, (1, 1))
        out = F.conv_transpose2d(_fast_layout(flat), w, None, st, p, op, channels)
        return out.contiguous().view(b, s, *ctx.in_shape)

    return _affine_rule(lin, back, None)


@register(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(m: nn.Module, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    scale, shift = ctx.affine
    view = _channel_view(scale, ctx.in_shape)
    return _affine_rule(lin, lambda A: A * view, lambda A: _channel_dot(A, shift))


@register(Normalize)
def _normalize(m: Normalize, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    inv = _channel_view(1.0 / m.std, ctx.in_shape)
    shift = (-m.mean / m.std).flatten()
    return _affine_rule(lin, lambda A: A * inv, lambda A: _channel_dot(A, shift))


@register(nn.Flatten)
def _flatten(m: nn.Flatten, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    if m.start_dim != 1 or m.end_dim != -1:
        raise TypeError(f"only Flatten(start_dim=1, end_dim=-1) is supported, got {m}")
    return _affine_rule(lin, lambda A: A.reshape(*A.shape[:2], *ctx.in_shape), None)


def relu_relaxation(pre: Interval) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(upper slope, upper intercept, adaptive lower slope, unstable mask)`` for pre-activation
    bounds ``pre``, all shaped like ``pre.lower``."""
    l, u = pre.lower, pre.upper
    active, inactive = l >= 0, u <= 0
    unstable = ~active & ~inactive
    width = torch.where(unstable, u - l, torch.ones_like(u))
    chord = torch.where(unstable, u / width, active.to(u.dtype))
    intercept = torch.where(unstable, -l * chord, torch.zeros_like(u))
    adaptive = torch.where(unstable, (u > -l).to(u.dtype), active.to(u.dtype))
    return chord, intercept, adaptive, unstable


def _lower_slope(adaptive: torch.Tensor, unstable: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    if alpha is None:
        return adaptive
    return torch.where(unstable, alpha, adaptive)


@register(nn.ReLU)
def _relu(m: nn.ReLU, lin: LinearBounds, ctx: LayerContext) -> LinearBounds:
    chord, intercept, adaptive, unstable = relu_relaxation(ctx.pre)
    chord_, adaptive_, unstable_ = chord.unsqueeze(1), adaptive.unsqueeze(1), unstable.unsqueeze(1)
    lA = lb = uA = ub = None
    # ``A * slope`` with the slope picked by the sign of ``A``, written as ``A * lower + A_part * (chord -
    # lower)``: no full-size ``where`` (whose backward pass is the most expensive step of CROWN-IBP
    # training); equal up to one rounding.
    if lin.lA is not None:  # lower bound: lower relaxation where the coefficient is >= 0, chord elsewhere
        lower = _lower_slope(adaptive_, unstable_, ctx.alpha_l)
        neg = lin.lA.clamp(max=0)
        lA = lin.lA * lower + neg * (chord_ - lower)
        lb = lin.lb + _dot(neg, intercept)
    if lin.uA is not None:
        lower = _lower_slope(adaptive_, unstable_, ctx.alpha_u)
        pos = lin.uA.clamp(min=0)
        uA = lin.uA * lower + pos * (chord_ - lower)
        ub = lin.ub + _dot(pos, intercept)
    return LinearBounds(lA, lb, uA, ub)


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


# ---------------------------------------------------------------------------------------------------
# Patches: CROWN for the neurons of a convolutional feature map without dense specifications.
#
# Every neuron (sample b, channel c, position (oh, ow)) of the feature map ``shapes[end]`` depends on a
# window of each earlier feature map: positions ``o * S - P + [0, K)`` per spatial axis. Its backward
# coefficients are kept as that window only, ``[N, C, Kh, Kw]`` for N neurons (one row each), and a
# convolution maps a window through ``conv_transpose2d`` without padding (``K -> (K - 1) s + d (k - 1) + 1``,
# ``S -> S s``, ``P -> P s + p``). Per-position tensors (ReLU relaxations, the input box) are cut into the
# same windows with ``unfold`` (zero padding), so coefficients of positions outside a feature map vanish at
# the next ReLU or at the input; after a padded convolution they are masked to zero at once, so that bias
# terms only ever see real neurons. Before the first ReLU the coefficients do not depend on the sample or
# the position: they are computed once per channel.

_PATCH_LAYERS = (nn.Conv2d, nn.AvgPool2d, nn.ReLU, nn.BatchNorm2d, Normalize)


def _patchable(chain: Chain, end: int) -> bool:
    """Whether the neurons of ``layers[:end]``'s output can be bounded with windows."""
    if len(chain.shapes[end]) != 3 or len(chain.shapes[0]) != 3:
        return False
    for m in chain.layers[:end]:
        if not isinstance(m, _PATCH_LAYERS):
            return False
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return False
        if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None
                                            or (not m.count_include_pad and any(_pair(m.padding)))):
            return False
    return True


def _window_geometry(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(kernel, stride, padding, dilation)`` pairs of a Conv2d or AvgPool2d."""
    if isinstance(m, nn.Conv2d):
        return tuple(m.weight.shape[2:]), _pair(m.stride), _pair(m.padding), _pair(m.dilation)
    return _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding), (1, 1)


@dataclass(frozen=True)
class _Windows:
    """Where the windows of a chunk of neuron rows lie, and how the rows are laid out.

    Grid layout (``b is None``): every position of channels ``c`` of ``nb`` consecutive samples; windowed
    tensors are ``[nb or 1, nc, L or 1, C, Kh, Kw]`` with ``L = H0 W0`` positions. Sparse layout: one
    row per selected neuron, sample ``b`` (within the chunk), channel ``c``, position ``oh``/``ow`` [N];
    windowed tensors are ``[N, C, Kh, Kw]``. ``K``, ``S``, ``P``: window size, stride and padding (pairs)
    on the current feature map."""

    out_hw: tuple[int, int]
    c: torch.Tensor
    b: torch.Tensor | None = None
    oh: torch.Tensor | None = None
    ow: torch.Tensor | None = None
    K: tuple[int, int] = (1, 1)
    S: tuple[int, int] = (1, 1)
    P: tuple[int, int] = (0, 0)

    def through(self, m: nn.Module) -> "_Windows":
        k, s, p, d = _window_geometry(m)
        K = tuple((self.K[j] - 1) * s[j] + d[j] * (k[j] - 1) + 1 for j in range(2))
        return replace(self, K=K, S=tuple(self.S[j] * s[j] for j in range(2)),
                       P=tuple(self.P[j] * s[j] + p[j] for j in range(2)))

    def rows(self, A: torch.Tensor) -> torch.Tensor:
        """The shared-phase windows [C0, C, Kh, Kw] (one per channel) laid out as rows."""
        A = A[self.c]
        return A if self.b is not None else A.unsqueeze(0).unsqueeze(2)

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        """The windows of ``t`` [b, C, H, W] (zero outside the map; ``b = 1``: the same for every sample)
        in this layout."""
        C, H, W = t.shape[1:]
        lh = (H + 2 * self.P[0] - self.K[0]) // self.S[0] + 1
        lw = (W + 2 * self.P[1] - self.K[1]) // self.S[1] + 1
        u = F.unfold(t, self.K, padding=self.P, stride=self.S).transpose(1, 2)  # [b, lh * lw, C*Kh*Kw]
        if self.b is None:
            h0, w0 = self.out_hw
            if (lh, lw) != (h0, w0):
                u = u.reshape(-1, lh, lw, u.shape[-1])[:, :h0, :w0]
            return u.reshape(-1, 1, h0 * w0, C, *self.K)
        rows = self.oh * lw + self.ow
        if t.shape[0] > 1:
            rows = rows + self.b * (lh * lw)
        return u.reshape(-1, u.shape[-1])[rows].view(-1, C, *self.K)

    def mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """1 on the window positions inside a feature map of ``shape``, 0 outside."""
        return self.cut(torch.ones((1, 1, *shape[1:]), dtype=like.dtype, device=like.device))


def _window_transpose(A: torch.Tensor, w: torch.Tensor, s, groups: int, d) -> torch.Tensor:
    """``conv_transpose2d`` of windows ``A`` [..., C, Kh, Kw] without padding. Through a layer with few
    input channels per output (the first convolution of an image net) CPU transposed convolutions are
    slow: there the window-to-window map (a matrix of ``C Kh Kw`` rows, built once) is a matmul."""
    lead, n_in = A.shape[:-3], A.shape[-3:].numel()
    flat = A.reshape(-1, *A.shape[-3:])
    if w.shape[1] * w.shape[2] * w.shape[3] > 64 or flat.shape[0] < 4 * n_in:
        out = F.conv_transpose2d(_fast_layout(flat), w, None, s, 0, 0, groups, d).contiguous()
    else:
        basis = torch.eye(n_in, dtype=A.dtype, device=A.device).view(n_in, *A.shape[-3:])
        M = F.conv_transpose2d(basis, w, None, s, 0, 0, groups, d)
        out = (flat.reshape(-1, n_in) @ M.flatten(1)).view(-1, *M.shape[1:])
    return out.view(*lead, *out.shape[1:])


def _patch_affine(m: nn.Module, i: int, chain: Chain, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One affine layer backwards on windows ``A`` [..., C, Kh, Kw]: the new windows and the bias term."""
    if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
        _, s, _, d = _window_geometry(m)
        if isinstance(m, nn.Conv2d):
            w, groups, b = m.weight, m.groups, m.bias
        else:
            channels, k = chain.shapes[i][0], _pair(m.kernel_size)
            w = torch.full((channels, 1, *k), 1.0 / (k[0] * k[1]), dtype=A.dtype, device=A.device)
            groups, b = channels, None
        term = None if b is None else A.sum((-1, -2)) @ b
        return _window_transpose(A, w, s, groups, d), term
    if isinstance(m, Normalize):
        scale, shift = 1.0 / m.std.flatten(), (-m.mean / m.std).flatten()
    else:
        scale, shift = chain.affine[i]
    return A * scale.view(-1, 1, 1), A.sum((-1, -2)) @ shift


def _add(b: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    return b if term is None else b + term


def _window_dot(A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum(A * t)`` over the window dimensions; one matmul while ``A`` is still the same for every
    sample and position (grid layout [1, nc, 1, ...] against ``t`` [b, 1, L, ...])."""
    if A.dim() == 6 and A.shape[0] == 1 and A.shape[2] == 1 and t.shape[1] == 1:
        out = t.flatten(3) @ A.flatten(3)[0, :, 0].T  # [b, 1, L, nc]
        return out.squeeze(1).transpose(1, 2)
    return (A * t).sum((-1, -2, -3))


def _patch_bounds(chain: Chain, end: int, box: Interval, relax: dict[int, tuple], win: _Windows
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN lower and upper bounds of the neurons ``win`` lays out (of ``layers[:end]``'s output).
    ``box`` and ``relax`` (``(chord, intercept, adaptive lower slope)`` [b, *shape] by ReLU layer index)
    hold the samples of this chunk."""
    C0 = chain.shapes[end][0]
    # shared phase: one row per channel, the same for all samples and positions, until the first ReLU
    # or the first padded window (whose padding must be masked per position before any bias term)
    A = torch.eye(C0, dtype=box.lower.dtype, device=box.lower.device).view(C0, C0, 1, 1)
    bias = torch.zeros(C0, dtype=A.dtype, device=A.device)
    i = end - 1
    while i >= 0 and not isinstance(chain.layers[i], nn.ReLU) and not any(win.P):
        A, term = _patch_affine(chain.layers[i], i, chain, A)
        bias = _add(bias, term)
        win = win.through(chain.layers[i]) if isinstance(chain.layers[i], (nn.Conv2d, nn.AvgPool2d)) else win
        i -= 1
    lA = uA = win.rows(A)
    lb = ub = win.rows(bias.view(C0, 1, 1, 1)).squeeze(-1).squeeze(-1).squeeze(-1)
    if any(win.P):
        lA = uA = lA * win.mask(chain.shapes[i + 1], lA)
    for i in range(i, -1, -1):
        m = chain.layers[i]
        if isinstance(m, nn.ReLU):
            chord, intercept, lower = (win.cut(t) for t in relax[i])
            lb = lb + _window_dot(lA.clamp(max=0), intercept)
            ub = ub + _window_dot(uA.clamp(min=0), intercept)
            lA = lA * torch.where(lA >= 0, lower, chord)
            uA = uA * torch.where(uA >= 0, chord, lower)
            continue
        same = lA is uA
        lA, term = _patch_affine(m, i, chain, lA)
        lb = _add(lb, term)
        if same:
            uA, ub = lA, _add(ub, term)
        else:
            uA, term = _patch_affine(m, i, chain, uA)
            ub = _add(ub, term)
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
            win = win.through(m)
            if any(_window_geometry(m)[2]):  # a padded layer: drop the coefficients of its padding
                mask = win.mask(chain.shapes[i], lA)
                lA = lA * mask
                uA = lA if same else uA * mask
    center, radius = win.cut(box.center), win.cut(box.radius)
    lo = _window_dot(lA, center) - _window_dot(lA.abs(), radius) + lb
    up = _window_dot(uA, center) + _window_dot(uA.abs(), radius) + ub
    return lo, up


def _widest_window(chain: Chain, end: int) -> int:
    """The largest ``C * Kh * Kw`` of a neuron's window on the way back from ``layers[:end]``."""
    win = _Windows((1, 1), None)
    widest = chain.shapes[end][0]
    for i in range(end - 1, -1, -1):
        if isinstance(chain.layers[i], (nn.Conv2d, nn.AvgPool2d)):
            win = win.through(chain.layers[i])
        widest = max(widest, chain.shapes[i][0] * win.K[0] * win.K[1])
    return widest


def _crown_neurons_patches(chain: Chain, end: int, box: Interval, pre: dict[int, Interval],
                           select: torch.Tensor | None, max_memory: int) -> Interval | None:
    """:func:`_crown_neurons` for a convolutional feature map, with windows instead of dense specs."""
    B = box.lower.shape[0]
    C0, H0, W0 = chain.shapes[end]
    L, n = H0 * W0, C0 * H0 * W0
    dtype, device = box.lower.dtype, box.lower.device
    relax = {i: relu_relaxation(pre[i])[:3] for i in chain.relus if i < end}
    per_row = _widest_window(chain, end) * box.lower.element_size() * 12  # ~12 window tensors alive at once
    rows = max(1, _chunk_budget(max_memory, device, 12) // per_row)

    def run(samples: slice, win: _Windows):
        return _patch_bounds(chain, end, Interval(box.lower[samples], box.upper[samples]),
                             {i: tuple(t[samples] for t in r) for i, r in relax.items()}, win)

    if select is None:  # grid layout: all positions of a range of channels of a range of samples
        lo = torch.empty(B, C0, L, dtype=dtype, device=device)
        up = torch.empty_like(lo)
        c_size = max(1, min(C0, rows // L))
        b_size = max(1, rows // (C0 * L)) if c_size == C0 else 1
        for bs in _chunks(B, b_size):
            for cs in _chunks(C0, c_size):
                lo[bs, cs], up[bs, cs] = run(bs, _Windows((H0, W0), torch.arange(cs.start, cs.stop, device=device)))
        return Interval(lo.view(B, n), up.view(B, n))
    rows_b, rows_n = select.nonzero(as_tuple=True)
    if rows_b.numel() == 0:
        return None
    lows, ups = [], []
    for rs in _chunks(rows_b.numel(), rows):
        b, k = rows_b[rs], rows_n[rs]
        samples = slice(int(b[0]), int(b[-1]) + 1)  # rows are sorted by sample
        lo, up = run(samples, _Windows((H0, W0), k // L, b - samples.start, (k // W0) % H0, k % W0))
        lows.append(lo)
        ups.append(up)
    inf = torch.full((B, n), float("inf"), dtype=dtype, device=device)
    return Interval((-inf).index_put((rows_b, rows_n), torch.cat(lows)),
                    inf.index_put((rows_b, rows_n), torch.cat(ups)))


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


# ---------------------------------------------------------------------------------------------------
# Public API.

def default_spec(x: torch.Tensor, num_classes: int, C: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    """``C`` if given, else the margins of ``y`` if given, else the identity (logit bounds): [B, S, K]."""
    B = x.shape[0]
    if C is None:
        if y is not None:
            C = margin_matrix(y, num_classes)
        else:
            C = torch.eye(num_classes, device=x.device).expand(B, -1, -1)
    if C.dim() != 3 or C.shape[0] != B or C.shape[2] != num_classes:
        raise ValueError(f"specification C must have shape [B={B}, S, K={num_classes}], got {tuple(C.shape)}")
    return C.to(x.dtype)


def prepare(model, x: torch.Tensor, threat, ref: torch.Tensor | None, eps: float | None, intermediate: str,
            intermediate_bounds, max_memory: int) -> tuple[Chain, Interval, dict[int, Interval]]:
    """The chain, the input box and the ReLU pre-activation bounds that every CROWN variant starts from."""
    check_supported(model, x.shape[1:])  # the layer-support contract (crown, crown_ibp, alpha_crown, chain BaB)
    if not torch.isfinite(x).all():
        raise ValueError("input x contains NaN or inf")
    chain = build_chain(model, x, x if ref is None else ref)
    box = threat.box(x, eps)
    pre = intermediate_bounds_of(chain, box, intermediate, intermediate_bounds, max_memory)
    return chain, box, pre


def crown(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, y: torch.Tensor | None = None,
          intermediate: str = "crown", ref: torch.Tensor | None = None, return_intermediate: bool = False,
          bound_lower: bool = True, bound_upper: bool = True,
          intermediate_bounds: Sequence[Interval | None] | None = None, eps: float | None = None,
          max_memory: int = DEFAULT_MAX_MEMORY, batch_stats: bool = False):
    """CROWN bounds of ``C z`` over the threat model's box around ``x``: an :class:`Interval` [B, S].

    ``C`` defaults to the margins of ``y`` (rows ``e_y - e_j``, ``j != y``) or, without ``y``, the
    identity (logit bounds). ``intermediate``: ``"crown"`` (default: full CROWN, auto_LiRPA's
    ``method="CROWN"``), ``"best"`` or ``"ibp"`` (CROWN-IBP; see :func:`crown_ibp` and the module docstring). A side not asked for is ``-inf`` / ``+inf``. With ``return_intermediate`` returns
    ``(bounds, pre_activation_bounds)``, the latter a list with one :class:`Interval` per ReLU in forward
    order. Differentiable (for training with CROWN-IBP). ``batch_stats``: accept a network with BatchNorm
    in training mode (batch statistics of ``ref``, for training); without it such a network is refused, and
    so is an ``x`` outside the threat model's data range
    (:func:`~certdist.propagation.ibp.check_bound_inputs`)."""
    if not (bound_lower or bound_upper):
        raise ValueError("at least one of bound_lower / bound_upper must be True")
    check_bound_inputs(model, x, threat, batch_stats)
    chain, box, pre = prepare(model, x, threat, ref, eps, intermediate, intermediate_bounds, max_memory)
    C = default_spec(x, chain.shapes[-1][0], C, y)
    out = bound_spec(chain, len(chain.layers), lambda bs, ss: C[bs, ss], C.shape[1], box, pre,
                     bound_lower, bound_upper, max_memory)
    if return_intermediate:
        return out, [pre[i] for i in chain.relus]
    return out


def crown_ibp(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, y: torch.Tensor | None = None,
              **kwargs):
    """CROWN-IBP (Zhang et al. 2020): IBP pre-activation bounds, a CROWN pass at the output."""
    return crown(model, x, threat, C=C, y=y, intermediate="ibp", **kwargs)
