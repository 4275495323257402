"""Schedules as pure functions of the global step (easy to test and to plot)."""
from __future__ import annotations

import math
from typing import Sequence


def smooth_eps(step: int, eps: float, start_step: int, ramp_steps: int, mid_point: float = 0.25,
               beta: float = 4.0) -> float:
    """The smoothed eps ramp of Shi et al. 2021 (auto_LiRPA's ``SmoothedScheduler``).

    0 before ``start_step``; then ``alpha * t^beta`` (polynomial "exponential" growth) up to
    ``mid_point`` of the ramp, then linear to ``eps`` with a matching slope at the switch;
    ``eps`` from ``start_step + ramp_steps`` on.
    """
    if step < start_step or eps == 0:
        return 0.0
    if ramp_steps <= 0 or step >= start_step + ramp_steps:
        return float(eps)
    final = start_step + ramp_steps
    mid = int(ramp_steps * mid_point) + start_step
    if mid <= start_step:  # ramp too short for the polynomial part: plain linear
        return float(eps) * (step - start_step) / ramp_steps
    t = (mid - start_step) ** (beta - 1.0)
    a = eps / ((final - mid) * beta * t + (mid - start_step) * t)
    mid_value = a * (mid - start_step) ** beta
    if step < mid:
        return float(a * (step - start_step) ** beta)
    return float(min(mid_value + (eps - mid_value) * (step - mid) / (final - mid), eps))


def lr_at(epoch: int, lr: float, milestones: Sequence[int], decay: float) -> float:
    """Step decay: ``lr * decay^k`` where k = number of milestones <= epoch (0-indexed epochs)."""
    return lr * decay ** sum(1 for m in milestones if epoch >= m)


def linear_decay(step: int, start: float, end: float, start_step: int, total_steps: int) -> float:
    """``start`` until ``start_step``, then linearly to ``end`` at ``total_steps``."""
    if step <= start_step or total_steps <= start_step:
        return start if step <= start_step else end
    frac = min(1.0, (step - start_step) / (total_steps - start_step))
    return start + (end - start) * frac


def distill_weight(step: int, schedule: str, ramp_end: int, total_steps: int) -> float:
    """The factor on beta at ``step``: ``constant`` 1; ``decay`` 1 until ``ramp_end`` (the end of the eps
    ramp), then linearly to 0 at ``total_steps``; ``late`` 0 until ``ramp_end``, then 1."""
    if schedule == "constant":
        return 1.0
    if schedule == "late":
        return 0.0 if step < ramp_end else 1.0
    if schedule == "decay":
        return linear_decay(step, 1.0, 0.0, ramp_end, total_steps)
    raise ValueError(f"unknown beta schedule {schedule!r}; known: constant, decay, late")


def scale_schedule(warmup: int, ramp: int, milestones: Sequence[int], ref_epochs: int,
                   epochs: int) -> tuple[int, int, tuple[int, ...]]:
    """A schedule made for ``ref_epochs`` epochs, scaled to ``epochs``: every epoch count times
    ``epochs / ref_epochs``, rounded half up; a ramp keeps at least one epoch and the warm-up is shortened
    so that the ramp ends by the last epoch; milestones that would fall at or past the last epoch are
    dropped (their decays would never happen). 10 -> 3 epochs: warm-up 1 -> 0, ramp 5 -> 2,
    milestones (8, 9) -> (2,)."""
    f = epochs / ref_epochs

    def scale(v: int) -> int:
        return int(math.floor(v * f + 0.5))
    r = min(max(1, scale(ramp)), epochs) if ramp > 0 else 0
    w = min(scale(warmup), max(0, epochs - max(r, 1)))
    ms = tuple(sorted(m for m in (scale(m) for m in milestones) if m < epochs))
    return w, r, ms
