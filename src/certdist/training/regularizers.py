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


def shi_regularizer(input_box: Interval, pre_relu: list[Interval], tol: float = 0.5) -> torch.Tensor:
    if not pre_relu:
        return input_box.lower.new_zeros(())
    tight0 = input_box.radius.mean()
    loss_t = input_box.lower.new_zeros(())
    loss_r = input_box.lower.new_zeros(())
    for b in pre_relu:
        center, radius = b.center, b.radius
        loss_t = loss_t + F.relu(tol - tight0 / radius.mean().clamp(min=1e-12)) / tol
        act, inact = (b.lower > 0).float(), (b.upper < 0).float()
        mean_act = (center * act).mean()
        mean_inact = (center * inact).mean()
        delta = (center - center.mean()) ** 2
        var_act, var_inact = (delta * act).sum(), (delta * inact).sum()
        mean_ratio = mean_act / -mean_inact
        var_ratio = var_act / var_inact
        mean_ratio = torch.min(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.min(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        lr_ = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(lr_):
            loss_r = loss_r + lr_
    return (loss_t + loss_r) / len(pre_relu)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return torch.stack(terms).sum()
