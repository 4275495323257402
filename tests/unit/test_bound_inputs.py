"""The public bound functions refuse what the rest of the package refuses: inputs outside the threat
model's data range (normalised data: the box would not contain x, and the bounds exclude the clean
outputs) and, unless asked for batch statistics, a network with BatchNorm in training mode (certify
verifies the eval-mode network)."""
from __future__ import annotations

import pytest
import torch

from certdist.propagation import alpha_crown, crown, crown_ibp, ibp
from certdist.threats import ThreatModel
from conftest import frozen_batch_stats_copy, random_net

FUNCTIONS = {
    "ibp": lambda net, x, th, **kw: ibp(net, x, th, **kw),
    "crown": lambda net, x, th, **kw: crown(net, x, th, **kw),
    "crown_ibp": lambda net, x, th, **kw: crown_ibp(net, x, th, **kw),
    "alpha_crown": lambda net, x, th, **kw: alpha_crown(net, x, th, iterations=2, **kw),
}


def _points(net, n: int = 3, seed: int = 0) -> torch.Tensor:
    spec = net.input_spec
    return torch.rand(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_inputs_outside_the_data_range_are_refused(name):
    net = random_net("conv", 0).eval()
    x = _points(net)
    x_norm = (x - 0.13) / 0.31  # normalised outside the model: values in about [-0.42, 2.8]
    with pytest.raises(ValueError, match=r"outside the threat model's data range.*normalisation inside the model"):
        FUNCTIONS[name](net, x_norm, ThreatModel(0.1))
    above = x.clone()
    above[1, 0, 2, 3] = 1.001  # one value just above 1
    with pytest.raises(ValueError, match="outside the threat model's data range"):
        FUNCTIONS[name](net, above, ThreatModel(0.1))
    with torch.no_grad():
        FUNCTIONS[name](net, x, ThreatModel(0.1))  # inside: fine
        FUNCTIONS[name](net, x_norm, ThreatModel(0.1, data_min=float(x_norm.min()), data_max=float(x_norm.max())))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_train_mode_batchnorm_needs_batch_stats(name):
    net = random_net("conv_bn", 1, bn_train=True)
    x = _points(net, n=4)
    threat = ThreatModel(0.02)
    with pytest.raises(ValueError, match=r"BatchNorm.*training mode.*model\.eval\(\).*batch_stats=True"):
        FUNCTIONS[name](net, x, threat)
    with torch.no_grad():
        train = FUNCTIONS[name](net, x, threat, batch_stats=True)  # explicit opt-in: batch statistics
        oracle = FUNCTIONS[name](frozen_batch_stats_copy(net, x), x, threat)
        assert torch.allclose(train.lower, oracle.lower, atol=1e-4)
        net.eval()
        evals = FUNCTIONS[name](net, x, threat)  # the eval-mode network, as certify verifies it
        assert torch.equal(evals.lower, FUNCTIONS[name](net, x, threat, batch_stats=True).lower)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_input_box_can_be_given_itself(name):
    """Bounds in, bound out: ``box=`` replaces the threat model's box (the same bounds for the same box;
    a smaller box gives bounds at least as tight), a box of another shape or with an ``eps`` is refused,
    and with a box the threat model may be None (no data range to check)."""
    net = random_net("conv", 0).eval()
    x = _points(net)
    threat = ThreatModel(0.1)
    with torch.no_grad():
        ref = FUNCTIONS[name](net, x, threat)
        same = FUNCTIONS[name](net, x, threat, box=threat.box(x))
        small = FUNCTIONS[name](net, x, None, box=ThreatModel(0.05).box(x))
    assert torch.equal(ref.lower, same.lower) and torch.equal(ref.upper, same.upper)
    assert (small.lower >= ref.lower - 1e-5).all() and (small.upper <= ref.upper + 1e-5).all()
    with pytest.raises(ValueError, match="shape"):
        FUNCTIONS[name](net, x, threat, box=threat.box(x[:1]))
    with pytest.raises(ValueError, match="no effect"):
        FUNCTIONS[name](net, x, threat, box=threat.box(x), eps=0.2)
