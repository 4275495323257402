"""Dense branch and bound must never prove a point by declaring a domain empty because two enclosures of a
neuron cross by rounding: with activations around 1e7-1e8 one float64 ulp is ~1e-8, far above an absolute
slack. The root contains the clean input and is never empty."""
from __future__ import annotations

import math

import torch

from certdist.verification.bab import bab_verify
from certdist.verification.dense import DenseNet, crown_bounds

F64 = torch.float64


def _net() -> DenseNet:
    """h0 = x0 - x1 (unstable on the box), h1 = 1e8 + 0 x (a fixed neuron, activation 1e8);
    logits = (-relu(h0) + 1e-9 relu(h1), 0.1 + 1e-9 relu(h1)): the margin of class 0 over class 1 is
    -relu(x0 - x1) - 0.1 < 0 everywhere (every point is a counterexample)."""
    W0 = torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=F64)
    b0 = torch.tensor([0.0, 1e8], dtype=F64)
    W1 = torch.tensor([[-1.0, 1e-9], [0.0, 1e-9]], dtype=F64)
    b1 = torch.tensor([0.0, 0.1], dtype=F64)
    return DenseNet([W0, W1], [b0, b1], (2,), [(2,)])


def _check(net: DenseNet, c: torch.Tensor):
    def check(x: torch.Tensor):
        return x if float(net.forward(x.view(1, -1)) @ c) < 0 else None
    return check


def test_root_with_bounds_crossed_by_one_ulp_is_not_verified():
    net = _net()
    x_lo, x_hi = torch.tensor([0.25, 0.25], dtype=F64), torch.tensor([0.75, 0.75], dtype=F64)
    lbs, ubs = crown_bounds(net, x_lo.view(1, -1), x_hi.view(1, -1))
    lbs, ubs = [l[0].clone() for l in lbs], [u[0].clone() for u in ubs]
    assert float(lbs[0][1]) == float(ubs[0][1]) == 1e8
    lbs[0][1] = math.nextafter(1e8, math.inf)  # the CROWN / IBP intersection of the fixed neuron, one ulp apart
    C = torch.tensor([[1.0, -1.0]], dtype=F64)
    res = bab_verify(net, x_lo, x_hi, C, 5.0, _check(net, C[0]), root_bounds=(lbs, ubs), alpha_steps=2)
    assert res.status == "falsified", res
    assert res.domains >= 1


def test_children_crossed_by_rounding_are_kept():
    """A child domain (split on h0) whose fixed neuron's bounds cross by one ulp stays in the search: with
    the crossing at every domain, the search must still find the counterexample, not drop every child."""
    net = _net()
    # a deeper copy: h1 feeds a second fixed neuron h2 = h1 (1e8) so that children re-bound it by CROWN
    W0, b0 = net.weights[0], net.biases[0]
    W1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    b1 = torch.zeros(2, dtype=F64)
    W2, b2 = net.weights[1], net.biases[1]
    deep = DenseNet([W0, W1, W2], [b0, b1, b2], (2,), [(2,), (2,)])
    x_lo, x_hi = torch.tensor([0.25, 0.25], dtype=F64), torch.tensor([0.75, 0.75], dtype=F64)
    lbs, ubs = crown_bounds(deep, x_lo.view(1, -1), x_hi.view(1, -1))
    lbs, ubs = [l[0].clone() for l in lbs], [u[0].clone() for u in ubs]
    for k in range(2):
        lbs[k][1] = math.nextafter(1e8, math.inf)
    C = torch.tensor([[1.0, -1.0]], dtype=F64)
    res = bab_verify(deep, x_lo, x_hi, C, 5.0, _check(deep, C[0]), root_bounds=(lbs, ubs), alpha_steps=0)
    assert res.status == "falsified", res
