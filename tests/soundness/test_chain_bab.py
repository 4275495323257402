"""Branch and bound on the layer chain against the exact MILP on tiny conv nets, and sampling checks of
the rule it adds to the propagation engine (CROWN re-bounding of split domains).

Every decided chain-BaB verdict must match the MILP's; every counterexample must be valid on the
float32 eval-mode model; a split domain's tightened pre-activation bounds must contain every sampled
point of the box that satisfies the split constraints.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certdist.bounds import Interval
from certdist.models import CertifiableNet, InputSpec, Normalize
from certdist.propagation.crown import build_chain, intermediate_bounds_of, relu_relaxation, tighten_intermediate
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification.certify import validate_counterexample
from certdist.verification.chain_bab import chain_bab_verify
from certdist.verification.dense import crown_bounds, dense_from_model
from certdist.verification.milp import milp_verify
from conftest import randomize_, relu_inputs, sample_box


def tiny_conv_net(seed: int, bn: bool = False) -> CertifiableNet:
    g = torch.Generator().manual_seed(seed)
    spec = InputSpec(1, 5, 3, (0.5,), (0.3,))
    feats = [Normalize(spec.mean, spec.std), nn.Conv2d(1, 3, 3, padding=1)] + ([nn.BatchNorm2d(3)] if bn else []) + \
        [nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU()]
    net = CertifiableNet(nn.Sequential(*feats), nn.Linear(8, 3), "tiny_conv", spec)
    return randomize_(net, g, 0.5).eval()


def _checker(net, x, y, threat):
    def check(flat):
        cand = threat.project(flat.float().view_as(x), x)
        return cand if validate_counterexample(net, cand, x, y, threat) else None
    return check


@pytest.mark.slow
@pytest.mark.parametrize("seed,bn", [(0, False), (1, True)])
def test_chain_bab_agrees_with_milp(seed, bn):
    """Every decided verdict equals the MILP's; near-ties (exact margin within 0.05 of 0) may stay
    unknown under the time cap, everything else must be decided."""
    net = tiny_conv_net(seed, bn)
    dense = dense_from_model(net, (1, 5, 5))
    g = torch.Generator().manual_seed(100 + seed)
    verdicts = []
    for k in range(2):
        x = torch.rand(1, 1, 5, 5, generator=g)
        y = int(net(x).argmax(1))
        for eps in (0.03, 0.08, 0.15):
            threat = ThreatModel(eps)
            C = margin_matrix(torch.tensor([y]), 3)[0]
            check = _checker(net, x, y, threat)
            res = chain_bab_verify(net, x, threat, C, 10.0, check, batch=8)  # generous: CI machines are shared
            box = threat.box(x)
            lo, hi = box.lower.flatten().double(), box.upper.flatten().double()
            lbs, ubs = crown_bounds(dense, lo.view(1, -1), hi.view(1, -1))
            ref = milp_verify(dense, lo, hi, C, [l[0] for l in lbs], [u[0] for u in ubs], 60.0, check)
            assert ref.status != "unknown", ref.message
            where = f"point {k}, eps {eps}: chain BaB {res.status} ({res.message}), MILP {ref.status} {ref.lower}"
            if res.status == "unknown":
                assert ref.status == "verified" and ref.lower < 0.05, where
                continue
            assert res.status == ref.status, where
            if res.status == "falsified":
                assert validate_counterexample(net, res.counterexample, x, y, threat)
            else:
                assert 0 < res.lower <= ref.lower + 1e-6, where  # a sound bound is below the exact minimum
            verdicts.append(res.status)
    assert {"verified", "falsified"} <= set(verdicts), f"only {set(verdicts)}: the test exercises one side"


def test_threshold_is_the_proving_level():
    """A margin proved positive is not proved above a threshold larger than the exact minimum."""
    net = tiny_conv_net(0)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    y = int(net(x).argmax(1))
    threat = ThreatModel(0.01)
    C = margin_matrix(torch.tensor([y]), 3)[0]
    res = chain_bab_verify(net, x, threat, C, 10.0, _checker(net, x, y, threat), alpha_steps=0)
    assert res.status == "verified"
    high = chain_bab_verify(net, x, threat, C, 3.0, _checker(net, x, y, threat), threshold=res.lower + 10.0,
                            alpha_steps=0)
    assert high.status == "unknown"


def test_chain_bab_rejects_bad_input():
    net = tiny_conv_net(0)
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="one point"):
        chain_bab_verify(net, x, ThreatModel(0.1), torch.eye(3), 1.0, lambda p: None)
    with pytest.raises(ValueError, match="C must"):
        chain_bab_verify(net, x[:1], ThreatModel(0.1), torch.eye(3)[0], 1.0, lambda p: None)
    iv = Interval(torch.zeros(1, 3, 5, 5), torch.ones(1, 3, 5, 5))
    with pytest.raises(ValueError, match="one Interval per ReLU"):
        chain_bab_verify(net, x[:1], ThreatModel(0.1), torch.eye(3), 1.0, lambda p: None, root_bounds=[iv])
    with pytest.raises(ValueError, match="shape"):
        chain_bab_verify(net, x[:1], ThreatModel(0.1), torch.eye(3), 1.0, lambda p: None, root_bounds=[iv] * 3)


def test_root_bounds_are_used_and_nan_falls_back_to_ibp():
    """Given root bounds replace the root's CROWN pass: point bounds at the clean input's pre-activations
    make every ReLU stable, so the search makes no split (without them it splits); NaN bounds (overflow)
    fall back to IBP, which still decides the row."""
    net = tiny_conv_net(0)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    y = int(net(x).argmax(1))
    C = margin_matrix(torch.tensor([y]), 3)[0]
    threat = ThreatModel(0.08)
    # point bounds: not valid over the box, only to show that they are what the search starts from
    pre = [Interval(z.double(), z.double()) for z in relu_inputs(net, x)]
    res = chain_bab_verify(net, x, threat, C, 0.5, _checker(net, x, y, threat), root_bounds=pre, alpha_steps=0)
    ref = chain_bab_verify(net, x, threat, C, 0.5, _checker(net, x, y, threat), alpha_steps=0)
    assert res.domains == len(C) < ref.domains  # one root per row, no split
    threat = ThreatModel(0.03)
    nan = [Interval(torch.full_like(iv.lower, float("nan")), torch.full_like(iv.upper, float("nan"))) for iv in pre]
    ref = chain_bab_verify(net, x, threat, C, 3.0, _checker(net, x, y, threat), alpha_steps=0)
    res = chain_bab_verify(net, x, threat, C, 3.0, _checker(net, x, y, threat), root_bounds=nan, alpha_steps=0)
    assert res.status == ref.status == "verified"


def _two_splits(net, x):
    """The tiny conv net's chain over the eps-0.2 box around ``x``, its CROWN pre-activation bounds, and
    the same bounds with two unstable neurons of the first ReLU split (the first active: ``l = 0``, the
    second inactive: ``u = 0``): ``(box, chain, pre, split, first ReLU's index, the two neurons)``."""
    box = ThreatModel(0.2).box(x)
    chain = build_chain(net, x)
    pre = intermediate_bounds_of(chain, box, "crown")
    first = chain.relus[0]
    _, _, _, unstable = relu_relaxation(pre[first])
    idx = torch.nonzero(unstable.flatten()).flatten()[:2]
    assert len(idx) == 2, "need two unstable neurons to split"
    lo, up = pre[first].lower.clone().flatten(), pre[first].upper.clone().flatten()
    lo[idx[0]], up[idx[1]] = 0.0, 0.0  # neuron 0 active, neuron 1 inactive
    split = dict(pre)
    split[first] = Interval(lo.view_as(pre[first].lower), up.view_as(pre[first].upper))
    return box, chain, pre, split, first, idx


@pytest.mark.parametrize("seed", [0, 1])
def test_tightened_split_bounds_contain_points_that_satisfy_the_splits(seed):
    net = tiny_conv_net(seed, bn=bool(seed))
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
    box, chain, pre, split, first, idx = _two_splits(net, x)
    tight = tighten_intermediate(chain, box, split, first + 1)
    later = [i for i in chain.relus if i > first]
    assert any((tight[i].lower > pre[i].lower + 1e-6).any() or (tight[i].upper < pre[i].upper - 1e-6).any()
               for i in later), "the splits should tighten some later bound"
    pts = sample_box(box.lower[0], box.upper[0], 20000, seed=seed)
    with torch.no_grad():
        acts = relu_inputs(net, pts)
    z = acts[0].flatten(1)
    keep = (z[:, idx[0]] >= 0) & (z[:, idx[1]] <= 0)
    assert keep.sum() > 100
    for k, i in enumerate(chain.relus):
        a = acts[k][keep]
        assert (a >= tight[i].lower - 1e-5).all() and (a <= tight[i].upper + 1e-5).all(), f"ReLU {k}"


@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_beta_bound_of_a_split_domain_holds_on_its_points(seed):
    """The margin bound with fixed or optimised split multipliers holds for every sampled point of the
    box that satisfies the split constraints, and optimising never loosens it. (A wrong sign of the
    multiplier term only loosens these bounds; test_chain_bab_agrees_with_milp catches it.)"""
    from certdist.verification.chain_bab import _backward, _bound_domains
    net = tiny_conv_net(seed, bn=bool(seed)).double().requires_grad_(False)  # as chain_bab_verify runs it
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(seed)).double()
    box, chain, pre, split, first, idx = _two_splits(net, x)
    split = tighten_intermediate(chain, box, split, first + 1)
    signs = {i: torch.zeros(v.lower.shape, dtype=torch.int8) for i, v in split.items()}
    signs[first].view(-1)[idx[0]], signs[first].view(-1)[idx[1]] = 1, -1
    y = int(net(x).argmax(1))
    pts = sample_box(box.lower[0], box.upper[0], 20000, seed=seed)
    with torch.no_grad():
        z = relu_inputs(net, pts)[0].flatten(1)
        keep = (z[:, idx[0]] >= 0) & (z[:, idx[1]] <= 0)
        logits = net(pts[keep])
    assert keep.sum() > 100
    for c in margin_matrix(torch.tensor([y]), 3)[0].double():
        for beta in (0.5, 2.0, 8.0):  # fixed multipliers: a bound of c.f - beta s z, below c.f on the domain
            betas = {first: beta * signs[first].double()}
            fixed = _backward(chain, box, split, c, betas=betas).concretize(box).lower[0, 0]
            assert (logits @ c >= fixed - 1e-6).all(), f"beta {beta}: a point of the split domain lies below"
        plain, _, _, _ = _bound_domains(chain, box, split, signs, c, 0, 0.1, 0.0)
        opt, _, _, state = _bound_domains(chain, box, split, signs, c, 20, 0.1, float("inf"))
        assert opt[0] >= plain[0] - 1e-9
        assert (logits @ c >= opt[0] - 1e-6).all(), "a point of the split domain lies below the bound"
        # warm starts (children start from their parent's slopes and multipliers): the given ones, even
        # out of range (slopes outside [0, 1], negative multipliers, which would be unsound unprojected)
        g = torch.Generator().manual_seed(seed)
        wild = ({i: torch.rand(a.shape, generator=g, dtype=a.dtype) * 3 - 1 for i, a in state[0].items()},
                {i: torch.randn(b.shape, generator=g, dtype=b.dtype) * 5 for i, b in state[1].items()})
        assert state[1] and any((b < 0).any() for b in wild[1].values())
        for warm in (state, wild):
            for steps in (0, 5):
                low, _, _, _ = _bound_domains(chain, box, split, signs, c, steps, 0.1, float("inf"), warm)
                assert (logits @ c >= low[0] - 1e-6).all(), f"warm start, {steps} steps: a point lies below"
        projected = ({i: a.clamp(0, 1) for i, a in wild[0].items()}, {i: b.clamp(min=0) for i, b in wild[1].items()})
        assert torch.equal(_bound_domains(chain, box, split, signs, c, 0, 0.1, 0.0, wild)[0],
                           _bound_domains(chain, box, split, signs, c, 0, 0.1, 0.0, projected)[0])
        warm_opt, _, _, _ = _bound_domains(chain, box, split, signs, c, 0, 0.1, 0.0, state)
        assert warm_opt[0] >= opt[0] - 1e-6, "the optimised state reproduces (about) its bound"


def test_children_are_tightened_from_their_own_split_layer():
    """A batch of children split in different layers is re-bounded child by child from the ReLU after its
    own split (grouped per split layer): the same bounds as one call per child; a child split in the last
    ReLU keeps its bounds."""
    from certdist.verification.chain_bab import _RowSearch
    net = tiny_conv_net(1, bn=True).double().requires_grad_(False)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(4)).double()
    threat = ThreatModel(0.2)
    box = threat.box(x)
    chain = build_chain(net, x)
    pre = intermediate_bounds_of(chain, box, "crown")
    kids, layers = [], []
    for layer in (chain.relus[0], chain.relus[1], chain.relus[-1], chain.relus[0]):
        _, _, _, unstable = relu_relaxation(pre[layer])
        j = int(torch.nonzero(unstable.flatten())[len(kids) % 2])
        child = {i: Interval(v.lower.clone(), v.upper.clone()) for i, v in pre.items()}
        (child[layer].lower if len(kids) % 2 else child[layer].upper).view(-1)[j] = 0.0
        kids.append(child)
        layers.append(layer)
    stacked = {i: Interval(torch.cat([k[i].lower for k in kids]), torch.cat([k[i].upper for k in kids]))
               for i in chain.relus}
    search = _RowSearch(net, chain, box, threat, torch.zeros(3, dtype=torch.float64), None, 0.0, 4, 0, 0.1,
                        1e9, 2 ** 30)
    got = search.tighten(stacked, layers)
    for n, (child, layer) in enumerate(zip(kids, layers)):
        ref = tighten_intermediate(chain, box, child, layer + 1)
        for i in chain.relus:
            close = lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731 (batched rounding)
            assert close(got[i].lower[n], ref[i].lower[0]) and close(got[i].upper[n], ref[i].upper[0]), (n, i)
    assert not torch.equal(got[chain.relus[-1]].lower[0], pre[chain.relus[-1]].lower[0]), "a split tightens"


def test_the_time_limit_stops_the_slope_optimisation():
    """The deadline is checked inside a batch's alpha-beta optimisation too, not only between batches:
    20,000 steps per batch (tens of seconds) with a 1 s limit end after about a second, unknown."""
    import time
    net = tiny_conv_net(0)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    y = int(net(x).argmax(1))
    threat = ThreatModel(0.01)  # robust (test_threshold_is_the_proving_level): no counterexample ends it
    C = margin_matrix(torch.tensor([y]), 3)[0]
    start = time.monotonic()
    res = chain_bab_verify(net, x, threat, C, 1.0, _checker(net, x, y, threat), threshold=1e9, alpha_steps=20000)
    assert res.status == "unknown" and time.monotonic() - start < 6.0, (res, time.monotonic() - start)
