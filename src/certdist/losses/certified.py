"""Certified-training losses as pure functions of logits / logit-difference bounds and labels.

Notation (METHOD.md): ``zd`` are the logit differences ``z_y - z_j`` for all ``j`` (0 for
``j = y``), shape [B, K]; ``zd_lb`` their lower bounds over the box. ``CE(-zd, y)`` equals the
cross-entropy of the logits (it is shift invariant), so at eps = 0 every loss here is standard CE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_differences(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - z_j`` for every j, shape [B, K]."""
    return logits.gather(1, y[:, None]) - logits


def ce_of_margins(zd: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``CE(-zd, y)``, mean over the batch: the worst-case cross-entropy given margin lower bounds."""
    return F.cross_entropy(-zd, y)


def standard_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def ibp_loss(zd_lb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce_of_margins(zd_lb, y)


def convex_combination_margins(logits_adv: torch.Tensor, zd_lb: torch.Tensor, y: torch.Tensor,
                               alpha: float) -> torch.Tensor:
    """``(1-alpha) zd(x_adv) + alpha zd_lb``: CC-IBP's margins (0 at the true class), [b, classes]."""
    return (1 - alpha) * logit_differences(logits_adv, y) + alpha * zd_lb


def cc_ibp_loss(logits_adv: torch.Tensor, zd_lb: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """CC-IBP: ``CE(-[(1-alpha) zd(x_adv) + alpha zd_lb], y)`` (De Palma et al. 2024)."""
    return ce_of_margins(convex_combination_margins(logits_adv, zd_lb, y, alpha), y)


def mtl_ibp_loss(logits_adv: torch.Tensor, zd_lb: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """MTL-IBP: ``(1-alpha) CE(z(x_adv), y) + alpha CE(-zd_lb, y)``."""
    return (1 - alpha) * F.cross_entropy(logits_adv, y) + alpha * ce_of_margins(zd_lb, y)


def exp_ibp_loss(logits_adv: torch.Tensor, zd_lb: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exp-IBP: ``CE(z(x_adv), y)^(1-alpha) * CE(-zd_lb, y)^alpha`` (batch means, as in the authors' code)."""
    adv = F.cross_entropy(logits_adv, y)
    rob = ce_of_margins(zd_lb, y)
    return adv.clamp(min=1e-12) ** (1 - alpha) * rob.clamp(min=1e-12) ** alpha


def mix_bounds(crown_lb: torch.Tensor, ibp_lb: torch.Tensor, beta: float) -> torch.Tensor:
    """CROWN-IBP's combination ``beta * CROWN + (1 - beta) * IBP`` of margin lower bounds."""
    return beta * crown_lb + (1 - beta) * ibp_lb
