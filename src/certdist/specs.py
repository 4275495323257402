"""Specification matrices ``C`` for "the true class beats every other class"."""
from __future__ import annotations

import torch


def check_labels(y, num_classes: int | None = None, n: int | None = None, where: str = "labels") -> None:
    """Raise ValueError (TypeError for a non-tensor) unless ``y`` holds integer class indices of shape
    [N] (``N = n`` when given) in ``[0, num_classes)`` (the range is checked when ``num_classes`` is
    given). Float labels (even integral ones) and one-hot / probability labels [N, K] are refused:
    pass ``y.argmax(1)`` for one-hot labels."""
    want = f"{where} must be integer class indices of shape [N]"
    if num_classes is not None:
        want += f" in [0, {num_classes})"
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{want}, got {type(y).__name__} (convert with torch.as_tensor(...).long())")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        hint = " (one-hot labels? pass y.argmax(1))" if y.dim() == 2 else " (convert with .long())"
        raise ValueError(f"{want}, got dtype {y.dtype} and shape {tuple(y.shape)}{hint}")
    if y.dim() != 1:
        hint = " (one-hot labels? pass y.argmax(1))" if y.dim() == 2 else ""
        raise ValueError(f"{want}, got shape {tuple(y.shape)}{hint}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{want}, one per input: got {y.shape[0]} labels for {n} inputs")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{want}, got range [{int(y.min())}, {int(y.max())}]")


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j != y`` in increasing ``j``: shape [B, K-1, K]. ``y``: integer
    class indices [B] in ``[0, num_classes)`` (:func:`check_labels`; ValueError otherwise)."""
    check_labels(y, num_classes)
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
