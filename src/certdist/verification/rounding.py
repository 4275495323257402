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


# ---------------------------------------------------------------------------------------------------
# A tighter bound per specification row: the rounding errors carried back through the network.
#
# The float32 network is the exact network with an additive error ``d_k`` at the output of every layer
# that rounds (``|d_k| <= r_k``, the recursion's own local term, with magnitudes that include the
# incoming error), and ReLU passes an error on times a factor ``s`` in [0, 1] (``relu(z + e) - relu(z)
# = s e``), with ``s = 1`` where the pre-activation and its float32 value are both >= 0 on the whole box
# and ``s = 0`` where both are <= 0. So ``c . (float32 output - exact output) = sum_k g_k . d_k`` with
# ``g_k`` the row ``c`` carried back to layer ``k``'s output through the transposed layers and the
# factors ``s``; an interval ``g_k`` (centre, radius) covers every choice of the free factors, and
# ``sum_k |g_k| . r_k`` bounds the row's error. Only the few unstable ReLUs widen ``g``: unlike the
# forward recursion (``|W| e`` at every layer), cancellations between the weights count.

# ``rule(m, gc, gr, step) -> (gc, gr)``: the interval row (centre, radius) [B*R, *output] at layer ``m``'s
# output carried to its input; ``step``: the input's shape, exact range, error bound and rows per sample.
TransposeRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, "_Step"], tuple[torch.Tensor, torch.Tensor]]
TRANSPOSE_RULES = LayerRules("rounding-transpose", by_hierarchy=True)  # layer type -> TransposeRule


class _Step:
    def __init__(self, in_shape: tuple, z: Interval, e: torch.Tensor, rows: int) -> None:
        self.in_shape, self.z, self.e, self.rows = in_shape, z, e, rows


def _transpose(*types: type):
    """Register ``f(m, g, in_shape, absolute) -> M^T g`` (``|M|^T g``) of a linear layer: the centre
    goes through ``M^T``, the radius through ``|M|^T``."""
    def deco(f):
        def rule(m: nn.Module, gc: torch.Tensor, gr: torch.Tensor, step: _Step):
            return f(m, gc, step.in_shape, False), f(m, gr, step.in_shape, True)
        TRANSPOSE_RULES.register(*types)(rule)
        return f
    return deco


def _vjp(f: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, in_shape: tuple) -> torch.Tensor:
    """``J^T g`` of the linear map ``f`` (rows of ``g`` [R, *out]) -> [R, *in_shape]."""
    with torch.inference_mode(False), torch.enable_grad():  # (callers may run under inference_mode)
        x = torch.zeros(g.shape[0], *in_shape, dtype=g.dtype, device=g.device, requires_grad=True)
        y = f(x)
        out, = torch.autograd.grad(y, x, g.clone().reshape(y.shape))
    return out


@_transpose(nn.Linear)
def _t_linear(m: nn.Linear, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    W = m.weight.to(g.dtype)
    return g @ (W.abs() if absolute else W)  # acts on the last dimension, any leading shape


@_transpose(nn.Conv2d)
def _t_conv(m: nn.Conv2d, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    def conv(x: torch.Tensor) -> torch.Tensor:  # the weights read inside _vjp's autograd-enabled block
        W = m.weight.to(g.dtype).clone()
        return F.conv2d(x, W.abs() if absolute else W, None, m.stride, m.padding, m.dilation, m.groups)
    return _vjp(conv, g, in_shape)


@_transpose(nn.AvgPool2d, nn.Flatten)
def _t_positive(m: nn.Module, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    return _vjp(m, g, in_shape)  # non-negative weights (or a reshape): |M| = M


@_transpose(nn.Identity, nn.Dropout)
def _t_identity(m: nn.Module, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    return g


@_transpose(nn.modules.batchnorm._BatchNorm)
def _t_batchnorm(m: nn.Module, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    scale, _ = batchnorm_affine(m, None)
    scale = scale.to(g.dtype)
    scale = scale.abs() if absolute else scale
    return g * scale.view(1, -1, *[1] * (g.dim() - 2))


@_transpose(Normalize)
def _t_normalize(m: Normalize, g: torch.Tensor, in_shape: tuple, absolute: bool) -> torch.Tensor:
    std = m.std.to(g.dtype)  # positive (Normalize refuses others)
    return g / std.view(1, -1, *[1] * (g.dim() - 2))


@TRANSPOSE_RULES.register(nn.ReLU)
def _t_relu(m: nn.ReLU, gc: torch.Tensor, gr: torch.Tensor, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu(z + e) - relu(z) = s e``, ``s`` in [0, 1]: 1 where the exact and the float32 pre-activation
    are both >= 0 on the whole box, 0 where both are <= 0, free elsewhere (the row's hull with 0)."""
    z, e, R = step.z, step.e, step.rows
    active = (z.lower >= e).repeat_interleave(R, 0)
    dead = (z.upper + e <= 0).repeat_interleave(R, 0)
    lo, hi = (gc - gr).clamp(max=0), (gc + gr).clamp(min=0)  # s g for s in [0, 1]
    gc_ = torch.where(active, gc, torch.where(dead, torch.zeros_like(gc), (lo + hi) / 2))
    gr_ = torch.where(active, gr, torch.where(dead, torch.zeros_like(gr), (hi - lo) / 2))
    return gc_, gr_


def _rounds(m: nn.Module) -> bool:
    """Whether the layer's float32 output carries rounding of its own (ReLU, reshapes: exact)."""
    return not isinstance(m, (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout))


def _carry_back(layers: list[nn.Module], end: int, G: torch.Tensor, ins: list[Interval], e_in: list[torch.Tensor],
                local: dict[int, torch.Tensor], input_slack: float) -> torch.Tensor:
    """``sum_k |g_k| . r_k`` (+ the input term) for the rows ``G`` [B, R, *shape of layers[end - 1]'s
    output] of one layer's output: the bound [B, R] of their float32 errors (see above)."""
    B, R = G.shape[:2]
    gc = G.reshape(B * R, *G.shape[2:])
    gr = torch.zeros_like(gc)
    total = torch.zeros(B, R, dtype=G.dtype, device=G.device)

    def dot(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # [B*R, ...] . [B, ...] -> [B, R]
        return (t.reshape(B, R, -1) * r.reshape(B, 1, -1)).sum(-1)
    for k in range(end - 1, -1, -1):
        m = layers[k]
        if k in local:
            total = total + dot(gc.abs() + gr, local[k])
        rule = TRANSPOSE_RULES.find(type(m))
        if rule is None:
            raise TypeError(f"no float32 rounding bound for layer {type(m).__name__}")
        gc, gr = rule(m, gc, gr, _Step(tuple(ins[k].lower.shape[1:]), ins[k], e_in[k], R))
    if input_slack:
        total = total + dot(gc.abs() + gr, torch.full_like(ins[0].lower, float(input_slack)))
    return total


def fp32_margin_tolerance(model: nn.Module, box: Interval, C: torch.Tensor, input_slack: float = 0.0,
                          relu_bounds: list[Interval | None] | None = None, max_neurons: int = 1024,
                          max_rows: int = 512) -> torch.Tensor:
    """Per specification row ``c`` of ``C`` [B, S, K], a bound [B, S] of ``|c . (float32 model(x') -
    exact model(x))|`` over all ``x`` in ``box`` and float32 ``x'`` within ``input_slack`` of ``x`` (as
    :func:`fp32_error_bound`), by carrying the rounding errors back through the network (see above);
    never looser than :func:`margin_tolerance` of :func:`fp32_error_bound`, which it starts from.

    The ReLUs' stability needs each pre-activation's float32 error: the forward recursion's, tightened
    the same way (every neuron of a layer carried back) where the layer has at most ``max_neurons``
    neurons for all ``B`` samples together (``max_rows`` rows at a time): per-point calls tighten, large
    batches rely on the final carry-back alone."""
    if box.lower.dtype != torch.float64:
        raise ValueError(f"fp32_margin_tolerance needs a float64 box and model (its own rounding must be far below "
                         f"float32's), got {box.lower.dtype}")
    layers = layers_of(model)
    with torch.no_grad():
        inter = exact_ranges(layers, box, relu_bounds)
        ins = [box, *inter[:-1]]
        e = torch.full_like(box.lower, float(input_slack))
        e_in: list[torch.Tensor] = []
        local: dict[int, torch.Tensor] = {}
        for k, (m, inp) in enumerate(zip(layers, ins)):
            e_in.append(e)
            nxt = _layer_error(m, inp, e)
            if _rounds(m):
                widened = Interval(inp.lower - e, inp.upper + e)  # magnitudes with the incoming error
                local[k] = _layer_error(m, widened, torch.zeros_like(e))
                feeds_relu = k + 1 < len(layers) and isinstance(layers[k + 1], nn.ReLU)
                n = nxt[0].numel()
                if feeds_relu and n * nxt.shape[0] <= max_neurons and torch.isfinite(local[k]).all():
                    shape = tuple(nxt.shape[1:])
                    B = nxt.shape[0]
                    parts = []
                    for start in range(0, n, max_rows):
                        rows = torch.arange(start, min(n, start + max_rows), device=e.device)
                        G = F.one_hot(rows, n).to(e.dtype).view(1, len(rows), *shape).expand(B, -1, *shape)
                        parts.append(_carry_back(layers, k + 1, G, ins, e_in, local, input_slack))
                    nxt = torch.minimum(nxt, torch.cat(parts, 1).view(B, *shape))
            e = nxt
        tol = margin_tolerance(e, C)
        if not torch.isfinite(tol).all():
            return tol
        back = _carry_back(layers, len(layers), C.to(e.dtype), ins, e_in, local, input_slack)
        return torch.minimum(tol, back)


def proved(lower: torch.Tensor, tol: torch.Tensor | float) -> torch.Tensor:
    """The one acceptance rule of every stage: a row is proved iff its (float64) lower bound exceeds the
    float32 tolerance; NaN proves nothing."""
    return lower > tol
