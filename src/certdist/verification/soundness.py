"""The soundness rule of every verification stage, in one place.

A margin row counts as proved only when its float64 lower bound, computed on a float64 copy of the
eval-mode network over the float32 input box, exceeds the row's float32 tolerance (:func:`tolerance`,
from :mod:`certdist.verification.rounding`; :func:`proved`); NaN proves nothing. A counterexample counts
only when :func:`validate_counterexample` accepts it on the eval-mode float32 network. This module imports
no complete verifier (BaB, MILP), so that :mod:`certdist.evaluation` can count IBP-certified points by the
same rule as ``certify`` (:func:`ibp_proved`) without loading them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from certdist.bounds import Interval
from certdist.propagation.ibp import check_fixed_batchnorm, ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification.rounding import fp32_margin_tolerance, proved

CEX_TOL = 1e-6


def eval_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy (BatchNorm with running statistics); the caller's model is untouched.
    Raises ValueError on a BatchNorm without running statistics (not a fixed function in eval mode)."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        check_fixed_batchnorm(m)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def box_float64(threat: ThreatModel, x: torch.Tensor) -> Interval:
    """The float32 box around ``x`` cast to float64: the box every bound is computed over (passed to the
    bound functions as ``box``). Bounds in float64 must cover every float32 point that
    :func:`validate_counterexample` accepts, and the float32 box ``clip(x -/+ eps)`` differs from the
    float64 one by its rounding."""
    box = threat.box(x)
    return Interval(box.lower.to(torch.float64), box.upper.to(torch.float64))


def tolerance(net64: nn.Module, box64: Interval, C: torch.Tensor,
              relu_bounds: list[Interval | None] | None = None) -> torch.Tensor:
    """Per-row float32 tolerance [B, S] of the margins ``C`` [B, S, K] over the box: a row is proved
    only when its lower bound exceeds it (:func:`certdist.verification.rounding.proved`). It covers
    float32 evaluation at every point :func:`validate_counterexample` accepts (box tolerance ``CEX_TOL``).
    ``relu_bounds``: sound pre-activation bounds over ``box64`` (CROWN's), which tighten the activation
    ranges the error recursion starts from and the ReLUs whose errors pass on
    (:func:`certdist.verification.rounding.fp32_margin_tolerance`: the errors carried back per row)."""
    return fp32_margin_tolerance(net64, box64, C, input_slack=CEX_TOL, relu_bounds=relu_bounds)


def ibp_proved(net64: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IBP as the pipeline counts it: ``(lower, tol, ok)``, the margins' IBP lower bounds [B, K-1] in
    float64 (``net64``: the float64 eval-mode copy) over the float32 boxes around ``x``, their float32
    tolerance, and ``ok`` [B]: every row proved (lower > tol; NaN never). Whether the float32 network
    classifies ``x`` correctly is the caller's check."""
    box64 = box_float64(threat, x)
    C = margin_matrix(y, num_classes).to(torch.float64)
    lower = ibp(net64, x.to(torch.float64), threat, C=C, box=box64).lower
    tol = tolerance(net64, box64, C)
    return lower, tol, proved(lower, tol).all(dim=1)


# ---------------------------------------------------------------------------------------------------
# Counterexamples.

def validate_counterexample(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: int,
                            threat: ThreatModel, tol: float = CEX_TOL) -> bool:
    """True iff ``x_adv`` ([1, ...], like ``x``) is inside the box (tolerance ``tol``), inside the data
    range and misclassified by ``model`` (which must be the eval-mode network)."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        return False
    if not bool(threat.contains(x_adv, x, tol).all()):
        return False
    if x_adv.min() < threat.data_min or x_adv.max() > threat.data_max:
        return False
    with torch.no_grad():
        return int(model(x_adv).argmax(1)) != int(y)


def candidate_checker(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel):
    """``check(flat float64 point) -> validated counterexample | None`` for BaB and the MILP. The point
    is first rounded to the model's dtype and projected onto the box (solver tolerances)."""
    def check(flat: torch.Tensor) -> torch.Tensor | None:
        cand = threat.project(flat.to(x.dtype).view_as(x), x)
        return cand if validate_counterexample(model, cand, x, y, threat) else None
    return check


__all__ = ["CEX_TOL", "box_float64", "candidate_checker", "eval_copy", "ibp_proved", "proved", "tolerance",
           "validate_counterexample"]
