"""The Shi et al. regulariser against a direct transcription of its definition."""
import torch
import torch.nn.functional as F

from certdist.bounds import Interval
from certdist.training.regularizers import l1_penalty, shi_regularizer
from conftest import random_net


def reference(input_box, pre_relu, tol):
    tight0 = input_box.radius.mean()
    lt = lr = 0.0
    for b in pre_relu:
        center, radius = b.center, b.radius
        lt = lt + F.relu(tol - tight0 / radius.mean()) / tol
        act, inact = (b.lower > 0).float(), (b.upper < 0).float()
        mean_act, mean_inact = (center * act).mean(), (center * inact).mean()
        delta = (center - center.mean()) ** 2
        mr = mean_act / -mean_inact
        vr = (delta * act).sum() / (delta * inact).sum()
        mr, vr = torch.min(mr, 1 / mr.clamp(min=1e-12)), torch.min(vr, 1 / vr.clamp(min=1e-12))
        term = (F.relu(tol - mr) + F.relu(tol - vr)) / tol
        if torch.isfinite(term):  # a layer without active or inactive neurons adds no balance term
            lr = lr + term
    return (lt + lr) / len(pre_relu)


def test_matches_definition():
    g = torch.Generator().manual_seed(0)
    box = Interval(torch.zeros(8, 1, 4, 4), torch.full((8, 1, 4, 4), 0.2))
    pre = []
    for shape, shift in (((8, 6, 3, 3), 0.3), ((8, 20), -0.4), ((8, 5), 2.0)):
        c = torch.randn(shape, generator=g).double() + shift
        r = torch.rand(shape, generator=g).double() * 0.5
        pre.append(Interval(c - r, c + r))
    for tol in (0.5, 2.0):
        torch.testing.assert_close(shi_regularizer(box, pre, tol).double(), reference(box, pre, tol).double(),
                                   rtol=1e-6, atol=1e-8)


def test_l1_penalty():
    net = random_net("conv", 0)
    expect = sum(m.weight.abs().sum() for m in net.modules() if hasattr(m, "weight") and m.weight is not None
                 and m.weight.dim() > 1)
    torch.testing.assert_close(l1_penalty(net), expect)
