"""Property-based tests (hypothesis) of the schedules and of IBP through small random chains (float64)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certdist.bounds import Interval
from certdist.propagation.ibp import propagate
from certdist.training.schedules import smooth_eps


@given(eps=st.floats(0.001, 1.0), start=st.integers(0, 50), ramp=st.integers(0, 300), step=st.integers(0, 500))
def test_smooth_eps_bounded_and_monotone(eps, start, ramp, step):
    v, w = smooth_eps(step, eps, start, ramp), smooth_eps(step + 1, eps, start, ramp)
    assert 0.0 <= v <= w <= eps + 1e-12
    if step < start:
        assert v == 0.0
    if step >= start + ramp:
        assert v == eps


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=5), seed=st.integers(0, 2**16),
       radius=st.floats(0.0, 2.0))
def test_ibp_chain_contains_samples(widths, seed, radius):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.randn(b, generator=g, dtype=torch.float64))
        layers += [lin, nn.ReLU()]
    c = torch.randn(1, widths[0], generator=g, dtype=torch.float64)
    r = torch.rand(1, widths[0], generator=g, dtype=torch.float64) * radius
    with torch.no_grad():
        out = propagate(layers, Interval(c - r, c + r))
        pts = c + (2 * torch.rand(500, widths[0], generator=g, dtype=torch.float64) - 1) * r
        z = nn.Sequential(*layers)(pts)
    assert (z >= out.lower - 1e-9).all() and (z <= out.upper + 1e-9).all()
