"""Each loss pinned to its definition."""
import pytest
import torch
import torch.nn.functional as F

from certdist.bounds import Interval
from certdist.losses import (cc_ibp_loss, distillation_loss, exp_ibp_loss, ibp_loss, logit_differences, mtl_ibp_loss,
                             worst_case_sq_distance)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits_adv = torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    zd_lb = logit_differences(logits_adv, y) - torch.rand(16, 10, generator=g) * 3
    zd_lb = zd_lb.scatter(1, y[:, None], 0.0)
    return logits_adv, zd_lb, y


def test_alpha_zero_is_adversarial_ce(batch):
    logits_adv, zd_lb, y = batch
    ce = F.cross_entropy(logits_adv, y)
    for fn in (cc_ibp_loss, mtl_ibp_loss, exp_ibp_loss):
        torch.testing.assert_close(fn(logits_adv, zd_lb, y, 0.0), ce)


def test_alpha_one_is_ibp_loss(batch):
    logits_adv, zd_lb, y = batch
    ref = F.cross_entropy(-zd_lb, y)
    for fn in (cc_ibp_loss, mtl_ibp_loss, exp_ibp_loss):
        torch.testing.assert_close(fn(logits_adv, zd_lb, y, 1.0), ref)
    torch.testing.assert_close(ibp_loss(zd_lb, y), ref)


def test_intermediate_alpha_definitions(batch):
    logits_adv, zd_lb, y = batch
    a = 0.3
    zd_adv = logits_adv.gather(1, y[:, None]) - logits_adv
    torch.testing.assert_close(cc_ibp_loss(logits_adv, zd_lb, y, a), F.cross_entropy(-((1 - a) * zd_adv + a * zd_lb), y))
    adv, rob = F.cross_entropy(logits_adv, y), F.cross_entropy(-zd_lb, y)
    torch.testing.assert_close(mtl_ibp_loss(logits_adv, zd_lb, y, a), (1 - a) * adv + a * rob)
    torch.testing.assert_close(exp_ibp_loss(logits_adv, zd_lb, y, a), adv ** (1 - a) * rob ** a)
    # CC-IBP is bounded by MTL-IBP (CE is convex in the logits)
    assert cc_ibp_loss(logits_adv, zd_lb, y, a) <= mtl_ibp_loss(logits_adv, zd_lb, y, a) + 1e-6


def test_distillation_equals_brute_force_maximum():
    g = torch.Generator().manual_seed(1)
    point = torch.randn(4, 6, generator=g)
    lo = point - torch.rand(4, 6, generator=g)
    hi = point + torch.rand(4, 6, generator=g)
    t = torch.randn(4, 6, generator=g)
    alpha = 0.4
    la, ua = (1 - alpha) * point + alpha * lo, (1 - alpha) * point + alpha * hi
    # every vertex of the 6-d box (64) plus random interior points: the max is at a vertex
    bits = ((torch.arange(64)[:, None] >> torch.arange(6)) & 1).bool()
    for i in range(4):
        verts = torch.where(bits, ua[i], la[i])
        inner = la[i] + torch.rand(2000, 6, generator=g) * (ua[i] - la[i])
        brute = max(((verts - t[i]) ** 2).sum(1).max(), ((inner - t[i]) ** 2).sum(1).max())
        assert worst_case_sq_distance(Interval(la[i:i + 1], ua[i:i + 1]), t[i:i + 1]).item() == pytest.approx(
            brute.item(), rel=1e-6)
    loss = distillation_loss(point, Interval(lo, hi), t, alpha)
    expect = torch.maximum((la - t) ** 2, (ua - t) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, expect)


def test_distillation_zero_when_box_collapses_on_teacher():
    t = torch.randn(3, 5)
    assert distillation_loss(t.clone(), Interval(t.clone(), t.clone()), t, 0.7).item() < 1e-10
    assert distillation_loss(t + 0.1, Interval(t.clone(), t + 0.2), t, 0.5).item() > 0


def test_distillation_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="projection"):
        distillation_loss(torch.zeros(2, 3), Interval.point(torch.zeros(2, 3)), torch.zeros(2, 4), 0.5)
