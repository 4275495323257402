"""The threat model: the one place where eps lives (pixel units, data in [lo, hi])."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certdist.bounds import Interval


def parse_eps(value: float | int | str) -> float:
    """An eps as a number or in the field's notation: ``0.1``, ``"0.1"``, ``"8/255"``, ``"2/255"``."""
    if isinstance(value, bool):
        raise ValueError(f"eps must be a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/")
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"eps must be a number or a fraction like 8/255, got {value!r}")


def format_eps(eps: float) -> str:
    """``8/255`` for a whole number of 8-bit pixel levels, else the number (``0.1``)."""
    k = float(eps) * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and abs(float(eps) - round(eps, 4)) > 1e-12:
        return f"{round(k)}/255"
    return f"{float(eps):g}"


@dataclass(frozen=True)
class ThreatModel:
    """An l_inf ball of radius ``eps`` (pixel units) intersected with the data range.

    Normalisation is a layer inside the model, so ``eps`` is never rescaled by hand. ``eps`` may be
    given as a string such as ``"8/255"``; it may not exceed the width of the data range (a larger box
    is the whole data range: almost always a unit mistake, e.g. eps in 0-255 pixel values).
    """

    eps: float
    norm: str = "linf"
    data_min: float = 0.0
    data_max: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):
            object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm != "linf":
            raise ValueError(f"unsupported norm {self.norm!r}; supported: 'linf'")
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not (math.isfinite(self.data_min) and math.isfinite(self.data_max)):
            raise ValueError(f"data range must be finite (bounds over an unbounded box are inf/NaN), got "
                             f"[{self.data_min}, {self.data_max}]")
        if not self.data_min < self.data_max:
            raise ValueError(f"data range must satisfy data_min < data_max, got [{self.data_min}, {self.data_max}]")
        check_eps_in_range(self.eps, self.data_min, self.data_max)

    def with_eps(self, eps: float) -> "ThreatModel":
        return ThreatModel(eps=float(eps), norm=self.norm, data_min=self.data_min, data_max=self.data_max)

    def box(self, x: torch.Tensor, eps: float | None = None) -> Interval:
        """The input box ``[clip(x - eps), clip(x + eps)]`` as an :class:`Interval`."""
        e = self.eps if eps is None else eps
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {e}")
        return Interval(
            (x - e).clamp(self.data_min, self.data_max),
            (x + e).clamp(self.data_min, self.data_max),
        )

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Project ``x_adv`` onto the box around ``x`` (always inside the data range)."""
        box = self.box(x, eps)
        return torch.max(torch.min(x_adv, box.upper), box.lower)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample boolean: is ``x_adv`` inside the box around ``x``?"""
        box = self.box(x)
        ok = (x_adv >= box.lower - tol) & (x_adv <= box.upper + tol)
        return ok.flatten(1).all(dim=1)


def check_eps_in_range(eps: float, data_min: float = 0.0, data_max: float = 1.0) -> None:
    """Reject an eps wider than the data range (images in [0, 1]: eps 8 instead of 8/255)."""
    if eps > data_max - data_min:
        raise ValueError(f"eps {eps:g} exceeds the data range [{data_min:g}, {data_max:g}] (width "
                         f"{data_max - data_min:g}); give eps in the data's units, e.g. 8/255 for 8 pixel levels")
