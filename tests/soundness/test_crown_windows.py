"""Full CROWN through windows (patches) equals the dense one-hot implementation on conv chains.

The windowed path (``_crown_neurons_patches``) and the dense path (``_crown_neurons_dense``) compute the
same CROWN bounds in a different order of summation; they are compared neuron by neuron on chains with
padding, strides, dilation, groups, average pooling, BatchNorm (eval and train mode), input sizes a
stride does not divide, convolutions without a ReLU between them, and budgets that force every kind of
chunking. The end-to-end bounds are sampled in test_crown_soundness.py and checked against auto_LiRPA in
test_crown_reference.py.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from certdist.models import Normalize
from certdist.propagation.crown import build_chain, intermediate_bounds_of
from certdist.propagation.crown.intermediate import _crown_neurons_dense
from certdist.propagation.crown.patches import _crown_neurons_patches, _patchable
from certdist.threats import ThreatModel
from conftest import random_net, randomize_


def _chain_net(kind: str, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    if kind == "dilated_grouped":
        layers = [Normalize((0.4, 0.5), (0.5, 0.8)), nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
                  nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 3, 2, stride=2, padding=1),
                  nn.ReLU()]
    elif kind == "odd_sizes_pool":  # 9x9 input: stride 2 leaves a row unused; pool with padding
        layers = [Normalize((0.4, 0.5), (0.5, 0.8)), nn.Conv2d(2, 3, 4, stride=2), nn.ReLU(),
                  nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.ReLU()]
    elif kind == "conv_conv":  # two convolutions without a ReLU between them, padded
        layers = [Normalize((0.4, 0.5), (0.5, 0.8)), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                  nn.ReLU()]
    else:
        raise ValueError(kind)
    net = nn.Sequential(*layers)
    return randomize_(net, g, 0.6).eval()


CASES = [("net", "conv", False), ("net", "conv_bn", False), ("net", "conv_bn", True),
         ("chain", "dilated_grouped", False), ("chain", "odd_sizes_pool", False), ("chain", "conv_conv", False)]


def _setup(source: str, kind: str, bn_train: bool, seed: int = 0):
    if source == "net":
        net = random_net(kind, seed, bn_train=bn_train)
        c, size = net.input_spec.channels, net.input_spec.size
    else:
        net, c, size = _chain_net(kind, seed), 2, 9
    x = torch.rand(3, c, size, size, generator=torch.Generator().manual_seed(seed))
    chain = build_chain(net, x)
    box = ThreatModel(0.1).box(x)
    pre = intermediate_bounds_of(chain, box, "crown")
    return chain, box, pre


@pytest.mark.parametrize("source,kind,bn_train", CASES)
@pytest.mark.parametrize("budget", [2 * 1024 ** 3, 20_000, 1])
def test_windows_equal_dense_crown(source, kind, bn_train, budget):
    chain, box, pre = _setup(source, kind, bn_train)
    ends = [i for i in list(chain.relus) + [len(chain.layers)] if _patchable(chain, i)]
    assert ends, "no feature map to test"
    g = torch.Generator().manual_seed(1)
    for end in ends:
        dense = _crown_neurons_dense(chain, end, box, pre, None, 2 * 1024 ** 3)
        full = _crown_neurons_patches(chain, end, box, pre, None, budget)
        torch.testing.assert_close(full.lower, dense.lower, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full.upper, dense.upper, atol=1e-5, rtol=1e-5)
        select = torch.rand(dense.lower.shape, generator=g) < 0.3
        select[1] = False  # a sample without selected neurons
        some = _crown_neurons_patches(chain, end, box, pre, select, budget)
        torch.testing.assert_close(some.lower[select], dense.lower[select], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(some.upper[select], dense.upper[select], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(some.lower[~select]).all() and torch.isposinf(some.upper[~select]).all()
    assert _crown_neurons_patches(chain, ends[0], box, pre, torch.zeros_like(select[:, :1]).expand(
        -1, int(torch.Size(chain.shapes[ends[0]]).numel())), budget) is None


def test_windows_are_used_only_for_conv_feature_maps():
    chain, _, _ = _setup("net", "conv_bn", False)
    flat = chain.layers.index(next(m for m in chain.layers if isinstance(m, nn.Flatten)))
    assert _patchable(chain, chain.relus[1])
    assert not any(_patchable(chain, i) for i in range(flat + 1, len(chain.layers) + 1))


def test_windows_are_differentiable_like_the_dense_path(monkeypatch):
    """Training through full CROWN (train-mode BatchNorm): the same parameter gradients either way."""
    crown_mod = importlib.import_module("certdist.propagation.crown")  # the package exports the function
    net = random_net("conv_bn", 0, bn_train=True)
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def grads():
        net.zero_grad()
        out = crown_mod.crown(net, x, ThreatModel(0.05), y=torch.tensor([0, 1, 2]), intermediate="crown",
                              bound_upper=False, batch_stats=True)
        out.lower.sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    windows = grads()
    monkeypatch.setattr(importlib.import_module("certdist.propagation.crown.intermediate"), "_patchable",
                        lambda *a: False)  # where the intermediate bounds choose the windows
    dense = grads()
    for a, b in zip(windows, dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
