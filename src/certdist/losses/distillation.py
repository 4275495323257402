"""CC-Dist's distillation loss (De Palma 2026, reconstructed form in METHOD.md).

The student's convex-combination box ``(1-alpha) h(x_adv) + alpha [l, u]`` and the teacher's
features ``t``: the worst case of ``||h - t||^2`` over the box is attained coordinate-wise at an
endpoint, so ``L = sum_j max((la_j - t_j)^2, (ua_j - t_j)^2)`` (mean over the batch).
"""
from __future__ import annotations

import torch

from certdist.bounds import Interval


def convex_combination_box(point: torch.Tensor, box: Interval, alpha: float) -> Interval:
    return Interval((1 - alpha) * point + alpha * box.lower, (1 - alpha) * point + alpha * box.upper)


def worst_case_sq_distance(box: Interval, target: torch.Tensor) -> torch.Tensor:
    """``sum_j max_{h in box} (h_j - t_j)^2`` per sample, shape [B]."""
    lo = (box.lower - target) ** 2
    hi = (box.upper - target) ** 2
    return torch.maximum(lo, hi).flatten(1).sum(dim=1)


def distillation_loss(point: torch.Tensor, box: Interval, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """The batch mean of the worst-case squared distance over the convex-combination box."""
    if point.shape != target.shape:
        raise ValueError(f"student features {tuple(point.shape)} and teacher features {tuple(target.shape)} "
                         "differ in shape; configure distill.projection=true to learn a linear map")
    return worst_case_sq_distance(convex_combination_box(point, box, alpha), target).mean()


def default_beta(feature_dim: int) -> float:
    """beta = 5 / feature_dim, the scaling of a third-party reimplementation (METHOD.md)."""
    return 5.0 / feature_dim
