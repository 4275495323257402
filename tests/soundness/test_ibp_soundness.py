"""IBP soundness: sampled points and box corners always lie inside the bounds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certdist.bounds import Interval
from certdist.models.layers import Normalize
from certdist.propagation.ibp import IBP_RULES, ibp, propagate
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from conftest import frozen_batch_stats_copy, random_net, sample_box

TOL = 1e-5


@pytest.mark.parametrize("kind,bn_train", [("mlp", False), ("conv", False), ("conv_bn", False), ("conv_bn", True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ibp_contains_samples_and_corners(kind, bn_train, seed):
    net = random_net(kind, seed, bn_train=bn_train)
    spec = net.input_spec
    g = torch.Generator().manual_seed(100 + seed)
    batch = torch.rand((6, spec.channels, spec.size, spec.size), generator=g)
    y = torch.randint(0, spec.num_classes, (6,), generator=g)
    eps = [0.01, 0.05, 0.2][seed]
    threat = ThreatModel(eps)
    with torch.no_grad():
        out = ibp(net, batch, threat, batch_stats=bn_train)
        margins = ibp(net, batch, threat, C=margin_matrix(y, spec.num_classes), batch_stats=bn_train)
    oracle = frozen_batch_stats_copy(net, batch) if bn_train else net.eval()
    box = threat.box(batch)
    for i in range(batch.shape[0]):
        pts = sample_box(box.lower[i], box.upper[i], 1000, seed=i)
        with torch.no_grad():
            z = oracle(pts)
        assert (z >= out.lower[i] - TOL).all() and (z <= out.upper[i] + TOL).all()
        C = margin_matrix(y[i:i + 1], spec.num_classes)[0]
        m = z @ C.T
        assert (m >= margins.lower[i] - TOL).all() and (m <= margins.upper[i] + TOL).all()


@pytest.mark.parametrize("layer", [
    nn.Linear(7, 5), nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
    Normalize([0.2, 0.4], [0.3, 0.9]), nn.AvgPool2d(2), nn.BatchNorm2d(2), nn.BatchNorm1d(7),
])
def test_each_rule_sound(layer):
    """Every registered layer rule, alone, on random boxes (eval mode for BatchNorm)."""
    torch.manual_seed(0)
    shape = (7,) if isinstance(layer, (nn.Linear, nn.BatchNorm1d)) else (2, 4, 4)
    layer.eval()
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            layer.weight.normal_()  # negative scales too
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.2, 2.0)
    c = torch.randn(3, *shape)
    r = torch.rand(3, *shape)
    box = Interval(c - r, c + r)
    with torch.no_grad():
        out = propagate([layer], box)
        for i in range(3):
            pts = sample_box(box.lower[i], box.upper[i], 1000, seed=i)
            z = layer(pts)
            assert (z >= out.lower[i] - TOL).all() and (z <= out.upper[i] + TOL).all()


def test_every_rule_is_tested():
    tested = {nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize, nn.AvgPool2d, nn.BatchNorm2d, nn.BatchNorm1d}
    assert set(IBP_RULES) == tested


def test_unknown_layer_raises():
    with pytest.raises(TypeError, match="no IBP rule for layer Tanh"):
        propagate([nn.Tanh()], Interval.point(torch.zeros(1, 3)))


def test_train_mode_batchnorm_without_reference_raises():
    bn = nn.BatchNorm1d(3).train()
    with pytest.raises(ValueError, match="training mode needs the clean activations"):
        propagate([bn], Interval.point(torch.zeros(2, 3)))


def test_zero_eps_collapses_to_forward():
    net = random_net("conv_bn", 3).eval()
    x = torch.rand(4, 3, 6, 6)
    with torch.no_grad():
        out = ibp(net, x, ThreatModel(0.0))
        z = net(x)
    torch.testing.assert_close(out.lower, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.upper, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["normalize", "avgpool"])
def test_decreasing_normalize_or_avgpool_is_refused(layer):
    """IBP maps the ends of the interval to the ends, which needs an increasing map: a Normalize with a
    negative std (from a loaded state_dict) or an AvgPool2d with a negative divisor_override gave a
    swapped interval, and certify's batched pre-pass answered 'verified' for a point the attack falsifies."""
    if layer == "normalize":
        first = Normalize([0.0], [1.0])
        first.load_state_dict({"mean": torch.zeros(1, 1, 1, 1), "std": -torch.ones(1, 1, 1, 1)})
    else:
        first = nn.AvgPool2d(1, divisor_override=-1)
    net = nn.Sequential(first, nn.Flatten(), nn.Linear(1, 2)).eval()
    with pytest.raises(ValueError, match="std|divisor_override"):
        ibp(net, torch.full((1, 1, 1, 1), 0.5), ThreatModel(0.2))
