"""Bound value types: immutable intervals and linear bounds."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``lower <= z <= upper`` (same shape, batch first)."""

    lower: torch.Tensor
    upper: torch.Tensor

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise ValueError(f"Interval bounds differ in shape: {tuple(self.lower.shape)} vs {tuple(self.upper.shape)}")

    @staticmethod
    def point(x: torch.Tensor) -> "Interval":
        return Interval(x, x)

    @staticmethod
    def from_center_radius(center: torch.Tensor, radius: torch.Tensor) -> "Interval":
        return Interval(center - radius, center + radius)

    @property
    def center(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def map(self, fn) -> "Interval":
        """Apply a monotone increasing elementwise/shape function to both ends."""
        return Interval(fn(self.lower), fn(self.upper))

    def contains(self, z: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
        return (z >= self.lower - tol) & (z <= self.upper + tol)

    def detach(self) -> "Interval":
        return Interval(self.lower.detach(), self.upper.detach())


@dataclass(frozen=True)
class LinearBounds:
    """Linear bounds of an output ``y`` (shape [B, S, ...]) in terms of an input ``x`` ([B, *in]).

    ``lA @ x + lb <= y <= uA @ x + ub`` where ``lA``/``uA`` have shape [B, S, *in] and ``lb``/``ub``
    shape [B, S]. Either side may be ``None`` when it is not needed.
    """

    lA: torch.Tensor | None
    lb: torch.Tensor | None
    uA: torch.Tensor | None
    ub: torch.Tensor | None

    def concretize(self, box: Interval) -> Interval:
        """Lower/upper bounds of the linear functions over the input box (Hoelder, per sample)."""
        c = box.center.flatten(1).unsqueeze(-1)  # [B, n, 1]
        r = box.radius.flatten(1).unsqueeze(-1)
        lo = up = None
        if self.lA is not None:
            A = self.lA.flatten(2)
            lo = (A @ c).squeeze(-1) - (A.abs() @ r).squeeze(-1) + self.lb
        if self.uA is not None:
            A = self.uA.flatten(2)
            up = (A @ c).squeeze(-1) + (A.abs() @ r).squeeze(-1) + self.ub
        if lo is None:
            lo = torch.full_like(up, -float("inf"))
        if up is None:
            up = torch.full_like(lo, float("inf"))
        return Interval(lo, up)
