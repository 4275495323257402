"""The IBP initialisation of Shi et al. 2021.

Every conv/linear weight but the last is drawn from N(0, sigma^2) with sigma = sqrt(2 pi) / fan_in,
which keeps the interval width roughly constant through depth at initialisation. Biases keep
PyTorch's default initialisation (as in the authors' code).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from certdist.models.support import WEIGHTED_LAYERS


def ibp_init(model: nn.Module) -> nn.Module:
    weighted = [m for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)]
    with torch.no_grad():
        for m in weighted[:-1]:
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
    return model
