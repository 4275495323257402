"""Our CROWN against auto_LiRPA 0.7.1's bounds on three fixed networks (../shared/reference).

The reference is full CROWN: pre-activation bounds from CROWN itself (no IBP), chord upper and adaptive
lower ReLU relaxation. Margins: auto_LiRPA's bounds of ``C z``, which equal CROWN with ``C`` at the
output (folding ``C`` into the last layer changes nothing for a backward pass).
"""
from __future__ import annotations

import pytest
import torch

from certdist.propagation import alpha_crown, crown
from certdist.threats import ThreatModel

NAMES = ["mlp_mnist", "conv_mnist", "conv_bn_cifar"]


@pytest.mark.parametrize("name", NAMES)
def test_crown_matches_auto_lirpa(lirpa_cases, name):
    case = lirpa_cases[name]
    net, x, y, exp = case["net"], case["x"], case["y"], case["expected"]
    threat = ThreatModel(case["eps"])
    with torch.no_grad():
        logits, pre = crown(net, x, threat, intermediate="crown", return_intermediate=True)
        # the same pre-activation bounds, passed back in (as branch and bound does): no recomputation
        margins = crown(net, x, threat, y=y, intermediate_bounds=pre, bound_upper=False)
    torch.testing.assert_close(logits.lower, exp["crown_logits_lb"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits.upper, exp["crown_logits_ub"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(margins.lower, exp["crown_margin_lb"], atol=2e-5, rtol=1e-4)
    assert torch.isinf(margins.upper).all() and (margins.upper > 0).all()


@pytest.mark.parametrize("name", ["mlp_mnist", "conv_mnist"])
def test_best_of_crown_and_ibp_and_alpha_are_at_least_as_tight(lirpa_cases, name):
    """Intersecting CROWN with IBP, or optimising the slopes, can only tighten the reference bounds."""
    case = lirpa_cases[name]
    net, x, y, exp = case["net"], case["x"], case["y"], case["expected"]
    threat = ThreatModel(case["eps"])
    with torch.no_grad():
        best, pre = crown(net, x, threat, y=y, intermediate="best", bound_upper=False, return_intermediate=True)
        _, pre_crown = crown(net, x, threat, intermediate="crown", return_intermediate=True)
        alpha = alpha_crown(net, x, threat, y=y, iterations=10, bound_upper=False, intermediate_bounds=pre_crown)
    assert (best.lower >= exp["crown_margin_lb"] - 2e-5).all()
    assert (alpha.lower >= exp["crown_margin_lb"] - 2e-5).all()
    assert (alpha.lower > exp["crown_margin_lb"] + 1e-4).any(), "alpha-CROWN should improve some bound"
