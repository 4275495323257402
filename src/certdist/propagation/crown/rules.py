"""CROWN's layer rules: one backward rule per layer type (:data:`CROWN_RULES`, exact type), mapping the
linear bounds ``A`` [b, s, *out_shape] of a layer's output to its input; and the ReLU relaxation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval, LinearBounds
from certdist.models.layers import Normalize
from certdist.models.support import LayerRules


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
CROWN_RULES = LayerRules("crown")  # exact layer type -> BackwardRule
register = CROWN_RULES.register


def backward_rule_for(module: nn.Module) -> BackwardRule:
    return CROWN_RULES.rule_for(module, "CROWN")


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


def _hw(v) -> tuple[int, int]:
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
    k, st, p = _hw(m.kernel_size), _hw(m.stride if m.stride is not None else m.kernel_size), _hw(m.padding)
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
