"""Batched data augmentation: random crop with zero padding and random horizontal flip.

Both transforms work on a whole batch ``[B, C, H, W]`` with tensor ops (no Python loop over
samples) and draw their randomness from an optional :class:`torch.Generator`, so a seeded
generator gives the same augmentation on every run. Random numbers are drawn on the
generator's device (CPU by default) and moved to the batch's device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop", "random_hflip"]


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x.shape)}")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each side by ``padding`` and crop back to ``H x W`` at a random offset per sample.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` with constant zero fill, applied
    independently to every sample. ``padding=0`` returns ``x`` unchanged.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    b, c, h, w = x.shape
    device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=device).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right independently with probability ``p``."""
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    device = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
