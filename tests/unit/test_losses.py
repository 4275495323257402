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


def test_distillation_variants_pinned():
    """point = box at alpha 0; the box loss splits exactly into centre + width parts; KL by hand."""
    from certdist.losses import box_decomposition, point_distance_loss, soft_label_kl
    g = torch.Generator().manual_seed(2)
    point, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    box = Interval(point - torch.rand(5, 7, generator=g), point + torch.rand(5, 7, generator=g))
    torch.testing.assert_close(point_distance_loss(point, t), distillation_loss(point, box, t, 0.0))
    centre, width = box_decomposition(point, box, t, 0.3)
    assert centre + width == pytest.approx(distillation_loss(point, box, t, 0.3).item(), rel=1e-5)
    assert width > 0 and box_decomposition(point, box, t, 0.0)[1] == pytest.approx(0.0, abs=1e-6)
    s, te = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    for T in (1.0, 4.0):
        q, p = F.softmax(te / T, 1), F.softmax(s / T, 1)
        expect = T ** 2 * (q * (q.log() - p.log())).sum(1).mean()
        torch.testing.assert_close(soft_label_kl(s, te, T), expect)
    assert soft_label_kl(te, te, 2.0).abs().item() < 1e-6
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_label_kl(s, te, 0.0)


@pytest.mark.parametrize("scaling", ["standardized", "normalized"])
def test_scale_free_features(scaling):
    """Scaled features: statistics as documented, intervals mapped exactly, and the loss does not change when
    the student's features (point and box) are multiplied by c > 0: the teacher's scale is not imported."""
    from certdist.losses import apply_scaling, scaling_statistics
    g = torch.Generator().manual_seed(3)
    f = torch.rand(200, 6, generator=g) * torch.tensor([1.0, 5.0, 0.5, 20.0, 2.0, 3.0]) + 2
    z = apply_scaling(f, *scaling_statistics(f, scaling))
    if scaling == "standardized":
        torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    else:
        assert z.norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-5)
    box = Interval(f - torch.rand(200, 6, generator=g), f + torch.rand(200, 6, generator=g))
    shift, scale = scaling_statistics(f, scaling)
    mapped = apply_scaling(box, shift, scale)
    inner = box.lower + torch.rand(200, 6, generator=g) * (box.upper - box.lower)
    assert mapped.contains(apply_scaling(inner, shift, scale), tol=1e-6).all()
    t = apply_scaling(f.flip(0), *scaling_statistics(f.flip(0), scaling))

    def loss(c):
        st = scaling_statistics(c * f, scaling)
        return distillation_loss(apply_scaling(c * f, *st), apply_scaling(Interval(c * box.lower, c * box.upper), *st),
                                 t, 0.2)
    assert loss(7.0).item() == pytest.approx(loss(1.0).item(), rel=1e-4)
    raw = [distillation_loss(c * f, Interval(c * box.lower, c * box.upper), t, 0.2).item() for c in (1.0, 7.0)]
    assert raw[1] > 10 * raw[0]  # raw features: the same change of scale dominates the loss


def test_dead_feature_dimension_does_not_explode():
    from certdist.losses import scaling_statistics
    f = torch.rand(50, 4)
    f[:, 2] = 0.0
    shift, scale = scaling_statistics(f, "standardized")
    assert scale[2] > 1e-4 and torch.isfinite(scale).all()
    with pytest.raises(ValueError, match="unknown feature scaling 'foo'"):
        scaling_statistics(f, "foo")
