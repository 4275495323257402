"""Our IBP against auto_LiRPA 0.7.1's bounds on three fixed networks (../shared/reference)."""
from __future__ import annotations

import pytest
import torch

from certdist.propagation.ibp import ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel


@pytest.mark.parametrize("name", ["mlp_mnist", "conv_mnist", "conv_bn_cifar"])
def test_ibp_matches_auto_lirpa(lirpa_cases, name):
    case = lirpa_cases[name]
    net, x, y, exp = case["net"], case["x"], case["y"], case["expected"]
    threat = ThreatModel(case["eps"])
    with torch.no_grad():
        logits = ibp(net, x, threat)
        margins = ibp(net, x, threat, C=margin_matrix(y, 10))
    torch.testing.assert_close(logits.lower, exp["ibp_logits_lb"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits.upper, exp["ibp_logits_ub"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(margins.lower, exp["ibp_margin_lb"], atol=2e-5, rtol=1e-4)
