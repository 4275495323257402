"""The per-batch objective of every method against its definition on random networks."""
import pytest
import torch
import torch.nn.functional as F

from certdist.config import load_config
from certdist.threats import ThreatModel
from certdist.training.objective import CERTIFIED_METHODS, StepContext, compute_loss, sabr_box
from conftest import random_net

ALL = ("standard", "pgd-at") + CERTIFIED_METHODS


def ctx(eps):
    return StepContext(eps=eps, eps_final=max(eps, 1e-9), reg_scale=0.0, crown_beta=0.5)


@pytest.mark.parametrize("method", ALL)
def test_eps_zero_is_standard_cross_entropy(method):
    net = random_net("conv_bn", 0, bn_train=True)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    cfg = load_config(None, [f"method={method}", "l1=0"])
    loss, _ = compute_loss(cfg, net, x, y, ctx(0.0))
    torch.testing.assert_close(loss, F.cross_entropy(net(x), y))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_bn"])
def test_gradients_finite(method, kind):
    net = random_net(kind, 1, bn_train=True)
    spec = net.input_spec
    x, y = torch.rand(8, spec.channels, spec.size, spec.size), torch.randint(0, spec.num_classes, (8,))
    cfg = load_config(None, [f"method={method}", "l1=1e-5", "attack.steps=2"])
    c = StepContext(eps=0.05, eps_final=0.1, reg_scale=0.5, crown_beta=0.5)
    loss, stats = compute_loss(cfg, net, x, y, c)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_sabr_full_box_centred_equals_ibp():
    """SABR with lambda = 1 and the clean point as centre propagates exactly IBP's box."""
    x = torch.rand(4, 1, 5, 5)
    torch.testing.assert_close(sabr_box(x, x, 0.1, 1.0).lower, ThreatModel(0.1).box(x).lower)
    torch.testing.assert_close(sabr_box(x, x, 0.1, 1.0).upper, ThreatModel(0.1).box(x).upper)
    net = random_net("mlp", 2).eval()
    y = torch.randint(0, 4, (4,))
    x = torch.rand(4, 1, 3, 3)
    sabr = load_config(None, ["method=sabr", "sabr_lambda=1.0", "attack.steps=0", "attack.random_start=false"])
    ibp = load_config(None, ["method=ibp"])
    torch.testing.assert_close(compute_loss(sabr, net, x, y, ctx(0.1))[0], compute_loss(ibp, net, x, y, ctx(0.1))[0])


def test_sabr_box_inside_original_box():
    x = torch.rand(16, 1, 5, 5)
    xa = ThreatModel(0.1).project(x + 0.3 * torch.randn_like(x), x)
    small = sabr_box(x, xa, 0.1, 0.3)
    big = ThreatModel(0.1).box(x)
    assert (small.lower >= big.lower - 1e-7).all() and (small.upper <= big.upper + 1e-7).all()
    assert ((small.upper - small.lower) <= 2 * 0.03 + 1e-6).all()


def test_alpha_extremes_through_objective():
    """CC-IBP with alpha = 1 equals IBP's loss; with alpha = 0 the adversarial CE."""
    net = random_net("conv", 3).eval()
    x, y = torch.rand(6, 2, 6, 6), torch.randint(0, 5, (6,))
    torch.manual_seed(0)
    a1 = compute_loss(load_config(None, ["method=cc-ibp", "alpha=1.0"]), net, x, y, ctx(0.1))[0]
    ib = compute_loss(load_config(None, ["method=ibp"]), net, x, y, ctx(0.1))[0]
    torch.testing.assert_close(a1, ib)
    from certdist.training import objective
    cfg0 = load_config(None, ["method=cc-ibp", "alpha=0.0"])
    torch.manual_seed(1)
    xa = objective.attack_point(cfg0, net, x, y, 0.1)
    torch.manual_seed(1)
    a0 = compute_loss(cfg0, net, x, y, ctx(0.1))[0]
    torch.testing.assert_close(a0, F.cross_entropy(net(xa), y))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "sabr", "cc-ibp", "mtl-ibp"])
def test_batchnorm_running_stats_come_from_the_clean_batch(method):
    """With momentum 1 the running statistics after one step equal the clean batch's statistics,
    whatever forward passes on adversarial points the method makes."""
    net = random_net("conv_bn", 4, bn_train=True)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    x, y = torch.rand(16, 3, 6, 6), torch.randint(0, 4, (16,))
    expect = __import__("copy").deepcopy(net)
    with torch.no_grad():
        expect(x)  # a clean train-mode forward with momentum 1: running stats = clean batch stats
    cfg = load_config(None, [f"method={method}", "attack.steps=2", "attack.train_mode=true"])
    compute_loss(cfg, net, x, y, StepContext(eps=0.1, eps_final=0.1, reg_scale=0.0, crown_beta=0.5))
    for (name, a), (_, b) in zip(net.named_buffers(), expect.named_buffers()):
        torch.testing.assert_close(a, b, msg=f"{method}: buffer {name}")


def test_kl_on_certified_logits_distils_the_worst_case_margins():
    """distill.student=certified: the KL's student side is CC-IBP's pseudo-logits -[(1-a) zd(x_adv) + a zd_IBP];
    with a = 0 it equals the adversarial-logits KL, with a = 1 the KL on -zd_IBP."""
    from certdist.losses.certified import logit_differences
    from certdist.losses.distillation import soft_label_kl
    from certdist.propagation.ibp import linear_spec_interval, propagate
    from certdist.specs import full_margin_matrix
    from certdist.training.objective import Teacher
    net = random_net("conv", 3).eval()
    teacher = Teacher(random_net("conv", 4).eval())
    x, y = torch.rand(6, 2, 6, 6), torch.randint(0, 5, (6,))
    base = ["method=cc-ibp", "alpha=0.3", "l1=0", "distill.teacher=t.pt", "distill.loss=kl", "distill.beta=1",
            "attack.steps=0", "attack.random_start=false"]  # x_adv = x: the CC-IBP part is deterministic
    cc = compute_loss(load_config(None, base[:3] + base[6:]), net, x, y, ctx(0.1))[0]

    def kl(*extra):
        return compute_loss(load_config(None, base + list(extra)), net, x, y, ctx(0.1), teacher)[0] - cc
    t = teacher.model(x)
    feat_box = propagate(list(net.features), ThreatModel(0.1).box(x))
    zd_lb = linear_spec_interval(net.head, feat_box, full_margin_matrix(y, 5)).lower
    torch.testing.assert_close(kl("distill.student=certified", "distill.alpha=0"), kl())
    torch.testing.assert_close(kl(), soft_label_kl(net(x), t, 4.0))
    torch.testing.assert_close(kl("distill.student=certified", "distill.alpha=1"), soft_label_kl(-zd_lb, t, 4.0))
    # default distillation alpha = the certified loss's alpha
    want = soft_label_kl(-(0.7 * logit_differences(net(x), y) + 0.3 * zd_lb), t, 4.0)
    torch.testing.assert_close(kl("distill.student=certified"), want)
    assert not torch.allclose(want, kl())
    with pytest.raises(ValueError, match="distill.student"):
        load_config(None, ["method=cc-ibp", "distill.loss=box", "distill.student=certified"])


@pytest.mark.parametrize("method", ALL)
def test_clean_accuracy_is_counted_on_every_step(method):
    """``clean_acc``: the batch's clean accuracy (train-mode network) at eps 0 and during the ramp alike,
    without touching the BatchNorm running statistics."""
    from certdist.propagation.ibp import frozen_bn_stats
    net = random_net("conv_bn", 4, bn_train=True)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    cfg = load_config(None, [f"method={method}", "attack.steps=1"])
    for eps in (0.0, 0.05):
        _, stats = compute_loss(cfg, net, x, y, ctx(eps))
        with torch.no_grad(), frozen_bn_stats(net):
            want = (net(x).argmax(1) == y).float().mean().item()
        assert stats["clean_acc"] == pytest.approx(want), eps
