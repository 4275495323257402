"""The CROWN entry points: :func:`crown`, :func:`crown_ibp` and :func:`prepare_chain` (the chain, box and
pre-activation bounds every CROWN variant starts from)."""
from __future__ import annotations

from typing import Sequence

import torch

from certdist.bounds import Interval
from certdist.models.support import check_supported
from certdist.propagation.crown.chain import DEFAULT_MAX_MEMORY, Chain, bound_spec, build_chain
from certdist.propagation.crown.intermediate import intermediate_bounds_of
from certdist.propagation.ibp import check_bound_inputs, input_box
from certdist.specs import margin_matrix


# ---------------------------------------------------------------------------------------------------
# Public API.

def default_spec(x: torch.Tensor, num_classes: int, C: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    """``C`` if given, else the margins of ``y`` if given, else the identity (logit bounds): [B, S, K]."""
    B = x.shape[0]
    if C is None:
        if y is not None:
            C = margin_matrix(y, num_classes)
        else:
            C = torch.eye(num_classes, device=x.device).expand(B, -1, -1)
    if C.dim() != 3 or C.shape[0] != B or C.shape[2] != num_classes:
        raise ValueError(f"specification C must have shape [B={B}, S, K={num_classes}], got {tuple(C.shape)}")
    return C.to(x.dtype)


def prepare_chain(model, x: torch.Tensor, threat, ref: torch.Tensor | None, eps: float | None, intermediate: str,
                  intermediate_bounds, max_memory: int, box: Interval | None = None
                  ) -> tuple[Chain, Interval, dict[int, Interval]]:
    """The chain, the input box (``box`` if given, else the threat model's around ``x``) and the ReLU
    pre-activation bounds that every CROWN variant starts from."""
    check_supported(model, x.shape[1:])  # the layer-support contract (crown, crown_ibp, alpha_crown, chain BaB)
    if not torch.isfinite(x).all():
        raise ValueError("input x contains NaN or inf")
    chain = build_chain(model, x, x if ref is None else ref)
    box = input_box(x, threat, eps, box)
    pre = intermediate_bounds_of(chain, box, intermediate, intermediate_bounds, max_memory)
    return chain, box, pre


def crown(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, y: torch.Tensor | None = None,
          intermediate: str = "crown", ref: torch.Tensor | None = None, return_intermediate: bool = False,
          bound_lower: bool = True, bound_upper: bool = True,
          intermediate_bounds: Sequence[Interval | None] | None = None, eps: float | None = None,
          max_memory: int = DEFAULT_MAX_MEMORY, batch_stats: bool = False, box: Interval | None = None):
    """CROWN bounds of ``C z`` over the threat model's box around ``x`` (or over ``box`` when given): an
    :class:`Interval` [B, S].

    ``C`` defaults to the margins of ``y`` (rows ``e_y - e_j``, ``j != y``) or, without ``y``, the
    identity (logit bounds). ``intermediate``: ``"crown"`` (default: full CROWN, auto_LiRPA's
    ``method="CROWN"``), ``"best"`` or ``"ibp"`` (CROWN-IBP; see :func:`crown_ibp` and the module docstring). A side not asked for is ``-inf`` / ``+inf``. With ``return_intermediate`` returns
    ``(bounds, pre_activation_bounds)``, the latter a list with one :class:`Interval` per ReLU in forward
    order. Differentiable (for training with CROWN-IBP). ``batch_stats``: accept a network with BatchNorm
    in training mode (batch statistics of ``ref``, for training); without it such a network is refused, and
    so is an ``x`` outside the threat model's data range
    (:func:`~certdist.propagation.ibp.check_bound_inputs`)."""
    if not (bound_lower or bound_upper):
        raise ValueError("at least one of bound_lower / bound_upper must be True")
    check_bound_inputs(model, x, threat, batch_stats)
    chain, box, pre = prepare_chain(model, x, threat, ref, eps, intermediate, intermediate_bounds, max_memory, box)
    C = default_spec(x, chain.shapes[-1][0], C, y)
    out = bound_spec(chain, len(chain.layers), lambda bs, ss: C[bs, ss], C.shape[1], box, pre,
                     bound_lower, bound_upper, max_memory)
    if return_intermediate:
        return out, [pre[i] for i in chain.relus]
    return out


def crown_ibp(model, x: torch.Tensor, threat, C: torch.Tensor | None = None, y: torch.Tensor | None = None,
              **kwargs):
    """CROWN-IBP (Zhang et al. 2020): IBP pre-activation bounds, a CROWN pass at the output."""
    return crown(model, x, threat, C=C, y=y, intermediate="ibp", **kwargs)
