"""How far the float32 network can be from its exact (real-arithmetic) function over an input box.

The verifier bounds the *exact* function of the network's float32 weights (in float64, whose own
rounding is ~2^29 times smaller than what is bounded here), but a user runs the float32 network, whose
rounding can tie or flip a class when the exact margin is tiny. This module gives,
for every logit, a bound ``e`` with ``|float32 logit - exact logit| <= e`` for *every* float32 input in
the box, by a forward error recursion over the layers (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, ch. 3): with ``u = 2^-24`` and ``gamma(n) = n u / (1 - n u)``, an affine output
``sum_i w_i a_i + b`` computed in float32 in any order of summation (with or without FMA) from inputs
``a^`` with ``|a^ - a| <= e_in`` and ``|a^| <= m`` differs from the exact one by at most

    |W| e_in + gamma(fan_in + 1) (|W| m + |b|),

``m`` taken from interval bounds of the exact activations over the box (plus ``e_in``), plus an absolute
``(fan_in + 1) * 2^-149`` for products that underflow into the subnormal range (Higham's model
``fl(a * b) = a b (1 + d) + h``, ``|h| <= 2^-150``; sums of subnormals are exact). A layer whose float32
intermediate values can reach the float32 overflow threshold (``inf`` in float32, finite in the exact
function) gets an infinite bound: nothing is proved there. ReLU does not
increase the error, and zeroes it where the pre-activation is ``<= -e_in`` on the whole box. A margin
row ``c`` is then safe in float32 when its exact lower bound exceeds ``|c|^T e`` (for ``e_y - e_j``:
``e_y + e_j``; strict, so a float32 tie, which ``argmax`` may break either way, is excluded too).

Assumptions (stated in docs/method.md): each output of a Linear/Conv2d/AvgPool2d is a float32 sum of
exactly rounded float32 products (direct, im2col/GEMM and blocked kernels; TF32 off, see
:func:`certdist.propagation.ibp.exact_fp32`; not Winograd/FFT convolutions).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval
from certdist.models.layers import Normalize
from certdist.models.support import LayerRules
from certdist.propagation.crown import layers_of
from certdist.propagation.ibp import batchnorm_affine, propagate

UNIT_ROUNDOFF = 2.0 ** -24  # float32
UNDERFLOW = 2.0 ** -149  # float32's smallest subnormal: twice the absolute error of an underflowing product
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def gamma(n: int, u: float = UNIT_ROUNDOFF) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` roundings."""
    if n * u >= 1:
        raise ValueError(f"no rounding error bound for {n} operations at unit roundoff {u}")
    return n * u / (1 - n * u)


def _magnitude(iv: Interval, e: torch.Tensor) -> torch.Tensor:
    return torch.maximum(iv.lower.abs(), iv.upper.abs()) + e


def _no_overflow(e: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``e`` where ``peak`` (a bound on every float32 intermediate of an output: products, partial sums)
    stays clear of float32 overflow, else ``inf`` (a float32 ``inf``/NaN logit can flip any class)."""
    return torch.where(peak * (1 + 1e-3) < FLOAT32_MAX, e, torch.full_like(e, float("inf")))


# One rule per layer type (looked up along the layer's class hierarchy, :func:`rounding_rule_for`):
# ``rule(m, inp, e)`` is the error bound after layer ``m`` given the exact input interval ``inp`` and the
# input error ``e``. Every type of the layer-support contract (:data:`certdist.models.support.SUPPORTED_LAYERS`)
# has one (tests/soundness/test_layer_support.py).
RoundingRule = Callable[[nn.Module, Interval, torch.Tensor], torch.Tensor]
ROUNDING_RULES = LayerRules("rounding", by_hierarchy=True)  # layer type -> RoundingRule
register = ROUNDING_RULES.register


def rounding_rule_for(m: nn.Module) -> RoundingRule:
    """The rule of ``m``'s type or of its nearest registered base class; TypeError when none."""
    rule = ROUNDING_RULES.find(type(m))
    if rule is None:
        raise TypeError(f"no float32 rounding bound for layer {type(m).__name__}")
    return rule


@register(nn.ReLU)
def _relu(m: nn.ReLU, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    return torch.where(inp.upper + e <= 0, torch.zeros_like(e), e)


@register(nn.Flatten)
def _flatten(m: nn.Flatten, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    return m(e)


@register(nn.Identity, nn.Dropout)
def _identity(m: nn.Module, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    return e


@register(nn.Linear)
def _linear(m: nn.Linear, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    mag = _magnitude(inp, e)
    W = m.weight.abs()
    b = m.bias.abs() if m.bias is not None else 0.0
    peak = F.linear(mag, W) + b
    return _no_overflow(F.linear(e, W) + gamma(m.in_features + 1) * peak + (m.in_features + 1) * UNDERFLOW, peak)


@register(nn.Conv2d)
def _conv(m: nn.Conv2d, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    mag = _magnitude(inp, e)
    if m.padding_mode != "zeros":
        raise TypeError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    W = m.weight.abs()
    conv = lambda t: F.conv2d(t, W, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
    b = m.bias.abs().view(1, -1, 1, 1) if m.bias is not None else 0.0
    n = W[0].numel()
    peak = conv(mag) + b
    return _no_overflow(conv(e) + gamma(n + 1) * peak + (n + 1) * UNDERFLOW, peak)


@register(Normalize)
def _normalize(m: Normalize, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    mag = _magnitude(inp, e)  # (x - mean) / std: two roundings
    peak = (mag + m.mean.abs()) / m.std
    return _no_overflow((e + gamma(3) * (mag + m.mean.abs())) / m.std + 2 * UNDERFLOW, peak)


@register(nn.modules.batchnorm._BatchNorm)
def _batchnorm(m: nn.modules.batchnorm._BatchNorm, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    mag = _magnitude(inp, e)
    # scale = w / sqrt(var + eps) and the shift are themselves rounded: a few more roundings
    scale, shift = batchnorm_affine(m, None)
    view = [1, -1] + [1] * (e.dim() - 2)
    s, t = scale.abs().view(view), shift.abs().view(view)
    mean = m.running_mean.abs().view(view)
    peak = s * (mag + mean) + t + (m.bias.abs().view(view) if m.bias is not None else 0.0)
    return _no_overflow(s * e + gamma(12) * (s * (mag + mean) + t) + 4 * UNDERFLOW * (1 + mag + mean), peak)


@register(nn.AvgPool2d)
def _avgpool(m: nn.AvgPool2d, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    mag = _magnitude(inp, e)  # a sum of k*k terms, then one division; weights > 0
    kh, kw = (m.kernel_size, m.kernel_size) if isinstance(m.kernel_size, int) else m.kernel_size
    out = m(e) + gamma(kh * kw + 2) * m(mag) + UNDERFLOW
    peak = kh * kw * mag.flatten(1).amax(1)  # the window sum (before the division), per sample
    return _no_overflow(out, peak.view(-1, *[1] * (out.dim() - 1)).expand_as(out))


def _layer_error(m: nn.Module, inp: Interval, e: torch.Tensor) -> torch.Tensor:
    """Error bound after layer ``m`` given the exact input interval ``inp`` and the input error ``e``."""
    return rounding_rule_for(m)(m, inp, e)


def exact_ranges(layers: list[nn.Module], box: Interval, relu_bounds: list[Interval | None] | None = None
                 ) -> list[Interval]:
    """The interval of every layer's exact output over ``box``: IBP, and with ``relu_bounds`` (sound
    pre-activation bounds over the same box, one per ReLU in forward order, e.g. CROWN's) each ReLU's
    input is intersected with its given bounds and IBP continues from the intersection. An empty
    intersection (rounding of two tight enclosures) keeps the IBP interval there."""
    if relu_bounds is None:
        return propagate(layers, box, return_all=True)[1]
    inter: list[Interval] = []
    given = iter(relu_bounds)
    cur = box
    for m in layers:
        if isinstance(m, nn.ReLU):
            g = next(given, None)
            if g is not None:
                lo = torch.maximum(cur.lower, g.lower.reshape(cur.lower.shape).to(cur.lower.dtype))
                hi = torch.minimum(cur.upper, g.upper.reshape(cur.upper.shape).to(cur.upper.dtype))
                ok = lo <= hi  # False also where either side is NaN: then IBP's own interval is kept
                cur = Interval(torch.where(ok, lo, cur.lower), torch.where(ok, hi, cur.upper))
                if inter:
                    inter[-1] = cur
        cur = propagate([m], cur)
        inter.append(cur)
    return inter


def fp32_error_bound(model: nn.Module, box: Interval, input_slack: float = 0.0,
                     relu_bounds: list[Interval | None] | None = None) -> torch.Tensor:
    """Per-logit bound ``e`` [B, K] of ``|float32 model(x') - exact model(x)|`` over all ``x`` in ``box``
    ([B, *input shape], ideally float64; ``model`` in eval mode, of the box's dtype) and all float32
    ``x'`` with ``|x' - x| <= input_slack`` (the box tolerance of a counterexample check: the slack
    enters the recursion as an input error). Infinite or NaN when the box or the network is (then
    nothing can be proved).

    The recursion needs the exact activations' ranges over the box: IBP's, or tighter ones through
    ``relu_bounds`` (see :func:`exact_ranges`): fewer ReLUs whose error survives and smaller
    magnitudes. Any sound enclosure keeps the bound sound."""
    layers = layers_of(model)
    with torch.no_grad():
        inter = exact_ranges(layers, box, relu_bounds)
        e = torch.full_like(box.lower, float(input_slack))
        for m, inp in zip(layers, [box, *inter[:-1]]):
            e = _layer_error(m, inp, e)
    return e


def margin_tolerance(err: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``|C| err``: the float32 error bound of each specification row (``C`` [B, S, K], ``err`` [B, K])."""
    return torch.einsum("bsk,bk->bs", C.abs().to(err.dtype), err)


def proved(lower: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
    """The one acceptance rule of every stage: a row is proved iff its (float64) lower bound exceeds the
    float32 tolerance; NaN proves nothing."""
    return lower > tol
