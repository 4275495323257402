"""Specification matrices ``C`` for "the true class beats every other class"."""
from __future__ import annotations

import torch


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j != y`` in increasing ``j``: shape [B, K-1, K]."""
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    B = y.shape[0]
    eye = torch.eye(num_classes, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(B, num_classes)
    mask = others != y.unsqueeze(1)
    js = others[mask].view(B, num_classes - 1)
    return eye[y].unsqueeze(1) - eye[js]


def full_margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j`` (the row j = y is zero): shape [B, K, K].

    Used by the expressive losses, whose cross-entropy runs over all K logit differences.
    """
    eye = torch.eye(num_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)
