"""CC-Dist's distillation losses (De Palma 2026, reconstructed form in METHOD.md) and the variants compared
on the validation split (docs/results.md), as pure functions.

- ``box`` (the paper's form): the student's convex-combination box ``(1-alpha) h(x_adv) + alpha [l, u]``
  and the teacher's features ``t``: the worst case of ``||h - t||^2`` over the box is attained
  coordinate-wise at an endpoint, so ``L = sum_j max((la_j - t_j)^2, (ua_j - t_j)^2)``.
- ``point``: ``||h(x_adv) - t||^2``, the plain distance of the adversarial point (no box).
- ``kl``: soft-label logit distillation (ARD / RSLAD): ``T^2 KL(softmax(t / T) || softmax(z(x_adv) / T))``.

Features may first be made scale-free (:func:`standardize` / :func:`normalize`): the teacher's with
statistics of its training-set features, the student's with (detached) statistics of the batch, so that
the student is asked to match the teacher's *pattern*, not its scale (raw matching imports the teacher's
feature norm and widens the student's IBP boxes, docs/results.md).
All losses are batch means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from certdist.bounds import Interval

FEATURE_SCALINGS = ("raw", "standardized", "normalized")


def convex_combination_box(point: torch.Tensor, box: Interval, alpha: float) -> Interval:
    return Interval((1 - alpha) * point + alpha * box.lower, (1 - alpha) * point + alpha * box.upper)


def worst_case_sq_distance(box: Interval, target: torch.Tensor) -> torch.Tensor:
    """``sum_j max_{h in box} (h_j - t_j)^2`` per sample, shape [B]."""
    lo = (box.lower - target) ** 2
    hi = (box.upper - target) ** 2
    return torch.maximum(lo, hi).flatten(1).sum(dim=1)


def _check_shapes(point: torch.Tensor, target: torch.Tensor) -> None:
    if point.shape != target.shape:
        raise ValueError(f"student features {tuple(point.shape)} and teacher features {tuple(target.shape)} "
                         "differ in shape; configure distill.projection=true to learn a linear map")


def distillation_loss(point: torch.Tensor, box: Interval, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """``box``: the batch mean of the worst-case squared distance over the convex-combination box."""
    _check_shapes(point, target)
    return worst_case_sq_distance(convex_combination_box(point, box, alpha), target).mean()


def box_decomposition(point: torch.Tensor, box: Interval, target: torch.Tensor, alpha: float) -> tuple[float, float]:
    """The ``box`` loss split as ``centre + width``: ``sum (|c - t| + r)^2 = ||c - t||^2 + (2 r |c - t| + r^2)``
    with ``c, r`` the centre and radius of the convex-combination box (batch means, for diagnostics)."""
    with torch.no_grad():
        b = convex_combination_box(point, box, alpha)
        gap = (b.center - target).abs().flatten(1)
        r = b.radius.flatten(1)
        centre = (gap ** 2).sum(1).mean().item()
        width = (2 * r * gap + r ** 2).sum(1).mean().item()
    return centre, width


def point_distance_loss(point: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``point``: the batch mean of ``||h(x_adv) - t||^2`` (no box)."""
    _check_shapes(point, target)
    return ((point - target) ** 2).flatten(1).sum(1).mean()


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``kl``: ``T^2 KL(softmax(t / T) || softmax(z / T))``, batch mean (Hinton et al.; ARD, RSLAD)."""
    _check_shapes(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


def _safe_scale(s: torch.Tensor) -> torch.Tensor:
    """A per-dimension scale with near-constant (dead) dimensions clamped at 1% of the mean scale."""
    return s.clamp(min=0.01 * float(s.mean()) + 1e-6)


def scaling_statistics(features: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` of a set of feature vectors ``[N, d]`` for :func:`apply_scaling`.

    ``standardized``: per-dimension mean and standard deviation; ``normalized``: no shift and the mean
    L2 norm (a scalar); ``raw``: 0 and 1.
    """
    if scaling not in FEATURE_SCALINGS:
        raise ValueError(f"unknown feature scaling {scaling!r}; known: {', '.join(FEATURE_SCALINGS)}")
    f = features.detach().flatten(1)
    zero, one = torch.zeros((), device=f.device), torch.ones((), device=f.device)
    if scaling == "standardized":
        return f.mean(0), _safe_scale(f.std(0, unbiased=False))
    if scaling == "normalized":
        return zero, f.norm(dim=1).mean().clamp(min=1e-6)
    return zero, one


def apply_scaling(x: torch.Tensor | Interval, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | Interval:
    """``(x - shift) / scale`` for a tensor or an interval (exact for intervals: ``scale > 0``)."""
    if isinstance(x, Interval):
        return Interval((x.lower - shift) / scale, (x.upper - shift) / scale)
    return (x - shift) / scale


def default_beta(feature_dim: int, loss: str = "box") -> float:
    """The default beta: 0.1 for the ``kl`` loss (chosen on the MNIST validation split, docs/results.md),
    else 5 / feature_dim, the scaling of a third-party reimplementation of the paper (METHOD.md)."""
    return 0.1 if loss == "kl" else 5.0 / feature_dim
