"""Interval bound propagation (Gowal et al. 2018) with one rule per layer type.

Each rule maps ``(module, Interval, ref)`` to ``(Interval, ref_out)``. ``ref`` is the clean
activation at this layer (or ``None``); it is only needed by BatchNorm in training mode, whose
affine map uses the statistics of the clean batch, as in the certified-training literature
(Shi et al. 2021, auto_LiRPA). Affine maps work on centre and radius: two matmuls each.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval
from certdist.models.cnn import as_certifiable
from certdist.models.layers import Normalize
from certdist.models.support import LayerRules, check_supported

Rule = Callable[[nn.Module, Interval, "torch.Tensor | None"], "tuple[Interval, torch.Tensor | None]"]
IBP_RULES = LayerRules("ibp")  # exact layer type -> Rule
register = IBP_RULES.register


def rule_for(module: nn.Module) -> Rule:
    return IBP_RULES.rule_for(module, "IBP")


def _sum_diff(inp: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """``u + l`` and ``u - l``: twice the centre and radius. Affine rules fold the 1/2 into their
    (small) weights instead of halving the (large) activations."""
    return inp.upper + inp.lower, inp.upper - inp.lower


@register(nn.Linear)
def _linear(m: nn.Linear, inp: Interval, ref):
    s, d = _sum_diff(inp)
    c = F.linear(s, 0.5 * m.weight, m.bias)
    r = F.linear(d, 0.5 * m.weight.abs())
    return Interval(c - r, c + r), (None if ref is None else F.linear(ref, m.weight, m.bias))


@register(nn.Conv2d)
def _conv(m: nn.Conv2d, inp: Interval, ref):
    if m.padding_mode != "zeros":
        raise TypeError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported (only 'zeros')")

    def conv(x, w, b):
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    s, d = _sum_diff(inp)
    c = conv(s, 0.5 * m.weight, m.bias)
    r = conv(d, 0.5 * m.weight.abs(), None)
    return Interval(c - r, c + r), (None if ref is None else conv(ref, m.weight, m.bias))


@register(nn.ReLU)
def _relu(m: nn.Module, inp: Interval, ref):
    return Interval(F.relu(inp.lower), F.relu(inp.upper)), (None if ref is None else F.relu(ref))


@register(nn.Flatten)
def _flatten(m: nn.Flatten, inp: Interval, ref):
    return inp.map(m), (None if ref is None else m(ref))


@register(Normalize)
def _normalize(m: Normalize, inp: Interval, ref):
    # std > 0: the map is increasing, so the ends map to the ends.
    if not bool((m.std > 0).all()):  # the constructor checks it, a loaded state_dict may not
        raise ValueError(f"Normalize with a std that is not positive ({m.std.flatten().tolist()}) cannot be bounded")
    return inp.map(m), (None if ref is None else m(ref))


@register(nn.AvgPool2d)
def _avgpool(m: nn.AvgPool2d, inp: Interval, ref):
    if m.divisor_override is not None and m.divisor_override <= 0:  # the map must be increasing
        raise ValueError(f"AvgPool2d with divisor_override={m.divisor_override} (not positive) is not supported")
    return inp.map(m), (None if ref is None else m(ref))


def check_fixed_batchnorm(m: nn.Module, eval_mode: bool = False) -> None:
    """Raise ValueError on an eval-mode BatchNorm without running statistics (``eval_mode``: judge the
    layer as if in eval mode, whatever its flag): it normalises every batch with that batch's own
    statistics, so the network is not a fixed function of one input and no bound, verdict or export of
    it can hold for the inputs a user will feed it."""
    if (isinstance(m, nn.modules.batchnorm._BatchNorm) and (eval_mode or not m.training)
            and not m.track_running_stats):
        raise ValueError(
            f"{type(m).__name__}({m.num_features}) has track_running_stats=False: in eval mode it still "
            "normalises with the statistics of whatever batch it gets, so the network is not a fixed function "
            "of its input and cannot be bounded, verified or exported; train it with "
            "track_running_stats=True (or replace it by a fixed affine map)")


def batchnorm_affine(m: nn.modules.batchnorm._BatchNorm, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` BatchNorm applies: running stats in eval mode, the clean
    batch's statistics (``ref``) in training mode. An eval-mode layer without running statistics is
    refused (:func:`check_fixed_batchnorm`)."""
    check_fixed_batchnorm(m)
    if m.training:
        if ref is None:
            raise ValueError(
                f"{type(m).__name__} in training mode needs the clean activations to take its batch "
                "statistics from; pass the clean input as `ref`, or put the model in eval mode")
        dims = [0] + list(range(2, ref.dim()))
        mean = ref.mean(dim=dims)
        var = ref.var(dim=dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    inv = torch.rsqrt(var + m.eps)
    scale = inv if m.weight is None else m.weight * inv
    shift = -mean * scale if m.bias is None else m.bias - mean * scale
    return scale, shift


@register(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(m: nn.modules.batchnorm._BatchNorm, inp: Interval, ref):
    scale, shift = batchnorm_affine(m, ref)
    shape = [1, -1] + [1] * (inp.lower.dim() - 2)
    a, t = scale.view(shape), shift.view(shape)
    sm, df = _sum_diff(inp)
    c = sm * (0.5 * a) + t
    r = df * (0.5 * a.abs())
    return Interval(c - r, c + r), (None if ref is None else ref * a + t)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Disable TF32 matmuls/convolutions on CUDA (10-bit mantissas would make certified counts
    unsound by up to ~1e-3 relative); restores the previous settings. A no-op on the CPU."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _is_train_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside do not change BatchNorm running statistics (train-mode passes on
    adversarial points still normalise with their batch statistics)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def needs_ref(layers: Iterable[nn.Module]) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in layers)


def propagate(layers: Iterable[nn.Module], box: Interval, ref: torch.Tensor | None = None,
              return_all: bool = False, update_bn_stats: bool = False):
    """Push ``box`` through ``layers``. Returns the output interval (and, with ``return_all``,
    the list of intervals after every layer, which CROWN-IBP and ReLU statistics use).

    ``update_bn_stats``: train-mode BatchNorm layers also update their running statistics from the
    clean activations ``ref`` (what their forward pass on the clean batch would do), so that the
    eval-mode network used for evaluation and verification has clean-data statistics."""
    layers = list(layers)
    if ref is not None and not needs_ref(layers):
        ref = None
    inter = []
    for m in layers:
        if update_bn_stats and ref is not None and _is_train_bn(m):
            with torch.no_grad():
                m.num_batches_tracked.add_(1)
                factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
                F.batch_norm(ref.detach(), m.running_mean, m.running_var, None, None, True, factor, m.eps)
        box, ref = rule_for(m)(m, box, ref)
        if return_all:
            inter.append(box)
    return (box, inter) if return_all else box


def linear_interval(layer: nn.Linear, inp: Interval) -> Interval:
    """IBP bounds of ``W z + b`` over the interval ``inp``."""
    out, _ = _linear(layer, inp, None)
    return out


def linear_spec_interval(head: nn.Linear, inp: Interval, C: torch.Tensor) -> Interval:
    """Bounds of ``C (W h + b)`` with ``C`` folded into the last layer (tighter than bounding the
    logits first). ``C``: [B, S, K]."""
    W = C @ head.weight  # [B, S, n]
    c = torch.einsum("bsn,bn->bs", W, inp.center)
    r = torch.einsum("bsn,bn->bs", W.abs(), inp.radius)
    if head.bias is not None:
        c = c + C @ head.bias
    return Interval(c - r, c + r)


def check_bound_inputs(model: nn.Module, x: torch.Tensor, threat, batch_stats: bool) -> None:
    """What every public bound function (:func:`ibp`, ``crown``, ``crown_ibp``, ``alpha_crown``) refuses
    before any work, with a ValueError naming the problem:

    - ``x`` outside the threat model's data range ``[data_min, data_max]``: the box
      ``clip(x +- eps, data_min, data_max)`` would not contain ``x`` itself, so the bounds would not hold
      at the clean input (typically data normalised outside the model);
    - a network with BatchNorm in training mode unless ``batch_stats``: its bounds would use the
      statistics of this batch, while evaluation and ``certify`` verify the eval-mode network (running
      statistics). The training losses pass ``batch_stats=True`` (the certified-training convention)."""
    if not torch.isfinite(x).all():
        raise ValueError("input x contains NaN or inf")
    lo, hi = getattr(threat, "data_min", None), getattr(threat, "data_max", None)
    if lo is not None and hi is not None and x.numel():
        x_min, x_max = float(x.min()), float(x.max())
        if not (x_min >= lo and x_max <= hi):  # NaN fails too
            raise ValueError(
                f"input x has values in [{x_min:g}, {x_max:g}], outside the threat model's data range "
                f"[{lo:g}, {hi:g}]: the box clip(x +- eps, {lo:g}, {hi:g}) would not contain x, so no bound "
                "over it holds at x. Give x in the data's units (e.g. images in [0, 1]) and put the "
                "normalisation inside the model (certdist.models.Normalize), or set the ThreatModel's "
                "data_min/data_max to the range of x")
    if not batch_stats:
        train_bn = [type(m).__name__ for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if train_bn:
            raise ValueError(
                f"the network has {len(train_bn)} BatchNorm layer(s) in training mode ({train_bn[0]}, ...): "
                "their bounds would use the statistics of this batch, not the running statistics of the "
                "eval-mode network that evaluation and certify verify; call model.eval(), or pass "
                "batch_stats=True for training bounds (batch statistics, as in certified training)")


def input_box(x: torch.Tensor, threat, eps: float | None = None, box: Interval | None = None) -> Interval:
    """The input box every bound function works on: ``box`` itself when given (bounds in, bound out; e.g.
    certify's float32 box cast to float64), else the threat model's box around ``x`` (radius ``eps`` if
    given). A given box must have ``x``'s shape and must not come with another ``eps``; with a box the
    threat model may be None (then nothing checks ``x`` against a data range: a VNN-LIB box)."""
    if box is None:
        if threat is None:
            raise ValueError("give a threat model or the input box itself (box=...)")
        return threat.box(x, eps)
    if eps is not None and (threat is None or eps != threat.eps):
        raise ValueError(f"the box is given, so eps={eps} has no effect")
    if tuple(box.lower.shape) != tuple(x.shape) or tuple(box.upper.shape) != tuple(x.shape):
        raise ValueError(f"the box has shape {tuple(box.lower.shape)}, x has shape {tuple(x.shape)}")
    return box


def ibp(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, eps: float | None = None,
        return_features: bool = False, batch_stats: bool = False, box: Interval | None = None):
    """IBP bounds of the model's outputs (or of ``C z`` when a specification is given) over the
    threat model's box around ``x``, or over ``box`` when given (:func:`input_box`). A network with BatchNorm
    in training mode is refused unless
    ``batch_stats`` (then those layers take their statistics from ``x``), and so is an ``x`` outside the
    threat model's data range (:func:`check_bound_inputs`).

    ``model``: a :class:`~certdist.models.CertifiableNet` or an ``nn.Sequential`` ending in an
    ``nn.Linear`` (split off as the head). With ``return_features`` the interval of the penultimate
    features is returned too."""
    check_supported(model, x.shape[1:])  # the layer-support contract, before any work
    check_bound_inputs(model, x, threat, batch_stats)
    model = as_certifiable(model)
    box = input_box(x, threat, eps, box)
    feats = propagate(model.features, box, ref=x)
    if C is None:
        out, _ = _linear(model.head, feats, None)
    else:
        out = linear_spec_interval(model.head, feats, C)
    return (out, feats) if return_features else out
