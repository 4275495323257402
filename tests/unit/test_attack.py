import pytest
import torch

from certdist.attacks import margin_loss, pgd
from certdist.threats import ThreatModel
from conftest import random_net


def test_pgd_stays_in_box_and_restores_mode():
    net = random_net("conv_bn", 0, bn_train=True)
    x = torch.rand(8, 3, 6, 6)
    y = torch.randint(0, 4, (8,))
    threat = ThreatModel(0.1)
    xa = pgd(net, x, y, threat, steps=10, restarts=2)
    assert net.training and all(m.training for m in net.modules())
    assert threat.contains(xa, x).all()
    assert (xa >= 0).all() and (xa <= 1).all()
    assert all(p.grad is None for p in net.parameters())


def test_pgd_never_worse_than_clean_point():
    net = random_net("mlp", 1).eval()
    x = torch.rand(64, 1, 3, 3)
    y = torch.randint(0, 4, (64,))
    xa = pgd(net, x, y, ThreatModel(0.2), steps=20, restarts=2, loss="margin")
    with torch.no_grad():
        assert (margin_loss(net(xa), y) >= margin_loss(net(x), y) - 1e-6).all()
        # a real attack on random nets flips some predictions
        assert (net(xa).argmax(1) != y).sum() >= (net(x).argmax(1) != y).sum()


def sum_of_pixels_net():
    """z0 = sum(x) - 1.7, z1 = 0: at x = 0.5 the margin is 0.3, and on the eps-0.1 box the only
    counterexamples are near the corner x = 0.4 (margin -0.1), the linear optimum."""
    from torch import nn
    from certdist.models import CertifiableNet, InputSpec, Normalize
    spec = InputSpec(1, 2, 2, (0.0,), (1.0,))
    net = CertifiableNet(nn.Sequential(Normalize((0.0,), (1.0,)), nn.Flatten()), nn.Linear(4, 2), "lin", spec).eval()
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]))
        net.head.bias.copy_(torch.tensor([-1.7, 0.0]))
    return net


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_attack_finds_the_corner_of_a_linear_model(attack):
    """On a linear model the optimum is a box corner: the attack must reach it."""
    from certdist.attacks import apgd
    net, x, y = sum_of_pixels_net(), torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    if attack == "pgd":
        xa = pgd(net, x, y, ThreatModel(0.1), steps=5, step_size=0.05)
    else:
        xa = apgd(net, x, y, ThreatModel(0.1), steps=10)
    assert torch.allclose(xa, torch.full_like(x, 0.4))


def test_apgd_stays_in_box_restores_mode_and_beats_clean():
    from certdist.attacks import apgd, apgd_ensemble
    net = random_net("conv_bn", 5, bn_train=True)
    x, y = torch.rand(16, 3, 6, 6), torch.randint(0, 4, (16,))
    threat = ThreatModel(0.1)
    for loss in ("ce", "dlr"):
        xa = apgd(net, x, y, threat, steps=20, loss=loss)
        assert threat.contains(xa, x).all() and (xa >= 0).all() and (xa <= 1).all()
        assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
        net.eval()
        with torch.no_grad():
            assert (margin_loss(net(xa), y) >= margin_loss(net(x), y) - 1e-6).all()
        net.train()
    xe = apgd_ensemble(net.eval(), x, y, threat, steps=20)
    assert threat.contains(xe, x).all()


def test_evaluate_with_apgd_is_at_most_pgd_and_at_least_certified():
    from certdist.evaluation import evaluate
    net = random_net("mlp", 6).eval()
    x, y = torch.rand(64, 1, 3, 3), torch.randint(0, 4, (64,))
    threat = ThreatModel(0.05)
    a = evaluate(net, x, y, threat, pgd_steps=30, progress=False, attack_name="apgd")
    assert a["ibp_cert_acc"] <= a["robust_acc"] <= a["clean_acc"] and a["attack"] == "apgd"
    # the result names the attack that ran: no PGD label on an APGD number
    assert "pgd_acc" not in a and "pgd_steps" not in a and a["attack_desc"].startswith("APGD-CE + APGD-DLR, 30 steps")
