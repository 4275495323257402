"""Warm-up regularisers of Shi et al. 2021 and the L1 weight penalty.

``tightness``: keeps the mean interval radius of each pre-ReLU layer from growing beyond the input
box's (relative to ``tol``). ``relu balance``: keeps the mean and variance of active and inactive
pre-activations balanced. Both act on IBP's pre-activation intervals and are scaled by
``1 - eps_t / eps`` so they fade out as the ramp finishes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certdist.bounds import Interval
from certdist.models.support import WEIGHTED_LAYERS


def shi_regularizer(input_box: Interval, pre_relu: list[Interval], tol: float = 0.5) -> torch.Tensor:
    if not pre_relu:
        return input_box.lower.new_zeros(())
    tight0 = input_box.radius.mean()
    loss_t = input_box.lower.new_zeros(())
    loss_r = input_box.lower.new_zeros(())
    for b in pre_relu:
        lo, up = b.lower.flatten(), b.upper.flatten()
        n = lo.numel()
        radius_mean = (up.sum() - lo.sum()) / (2 * n)
        loss_t = loss_t + F.relu(tol - tight0 / radius_mean.clamp(min=1e-12)) / tol
        # masked means and variances of the centres via dot products with the masks (no
        # temporaries of the full size beyond c and c^2; memory traffic dominates this term)
        c = (up + lo) * 0.5
        act = (lo > 0).to(c.dtype)
        inact = (up < 0).to(c.dtype)
        c2 = c * c
        mean = c.sum() / n
        s_act, s_inact = c @ act, c @ inact
        mean_act, mean_inact = s_act / n, s_inact / n
        # sum over a mask of (c - mean)^2 = sum c^2 - 2 mean sum c + count mean^2
        var_act = c2 @ act - 2 * mean * s_act + act.sum() * mean ** 2
        var_inact = c2 @ inact - 2 * mean * s_inact + inact.sum() * mean ** 2
        mean_ratio = mean_act / -mean_inact
        var_ratio = var_act / var_inact
        mean_ratio = torch.min(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.min(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        lr_ = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(lr_):
            loss_r = loss_r + lr_
    return (loss_t + loss_r) / len(pre_relu)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)]
    return torch.stack(terms).sum()
