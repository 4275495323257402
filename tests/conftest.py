"""Shared test helpers: random networks covering every supported layer, reference networks."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certdist.models import CertifiableNet, InputSpec, Normalize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not SHARED.exists():  # CI clones the repo next to ../shared as well; also allow an override
    import os
    SHARED = Path(os.environ.get("CERTDIST_SHARED", "/work/shared")) / "reference"


def tiny_run_yaml(train_limit: int) -> str:
    """The shared part of the tiny synthetic-data configs of the reproduce / front tests (2 epochs, an MLP)."""
    return (f"data: {{dataset: synthetic, train_limit: {train_limit}}}\nmodel: {{arch: mlp}}\neps: 0.05\nepochs: 2\n"
            "warmup_epochs: 1\nramp_epochs: 1\nlr: 2.0e-3\nlr_milestones: []\neval: {pgd_steps: 3}\n")


def write_tiny_teacher_and_student(folder: Path, train_limit: int) -> None:
    """``teacher.yaml`` (PGD-AT, 3 steps) and ``student.yaml`` (CC-IBP) in ``folder``: the tiny runs of the
    reproduce / front tests."""
    common = tiny_run_yaml(train_limit)
    (folder / "teacher.yaml").write_text(common + "name: t\nmethod: pgd-at\nmodel: {arch: mlp, init: default}\n"
                                         "attack: {steps: 3, step_size: 0.5}\nreg_weight: 0\n")
    (folder / "student.yaml").write_text(common + "name: s\nmethod: cc-ibp\n")


def random_net(kind: str, seed: int, bn_train: bool = False) -> CertifiableNet:
    """Small random networks that exercise every layer type the engines support."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        spec = InputSpec(1, 3, 4, (0.3,), (0.7,))
        feats = [Normalize(spec.mean, spec.std), nn.Flatten(), nn.Linear(9, 12), nn.ReLU(),
                 nn.Linear(12, 10), nn.ReLU()]
        head = nn.Linear(10, 4)
    elif kind == "conv":
        spec = InputSpec(2, 6, 5, (0.4, 0.5), (0.5, 0.8))
        feats = [Normalize(spec.mean, spec.std), nn.Conv2d(2, 4, 3, stride=1, padding=1), nn.ReLU(),
                 nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                 nn.Linear(6, 8), nn.ReLU()]
        head = nn.Linear(8, 5)
    elif kind == "conv_bn":  # CNN7-shaped: conv-BN-ReLU blocks, linear-BN1d-ReLU, linear head
        spec = InputSpec(3, 6, 4, (0.5, 0.4, 0.3), (0.3, 0.25, 0.2))
        feats = [Normalize(spec.mean, spec.std), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                 nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                 nn.Linear(36, 10), nn.BatchNorm1d(10), nn.ReLU()]
        head = nn.Linear(10, 4)
    else:
        raise ValueError(kind)
    net = CertifiableNet(nn.Sequential(*feats), head, arch=f"test_{kind}", input_spec=spec)
    randomize_(net, g, 0.6)
    net.train(bn_train)
    return net


@torch.no_grad()
def randomize_(net: nn.Module, g: torch.Generator, scale: float, var_min: float = 0.5) -> nn.Module:
    """Random weights ``N(0, scale^2)`` and non-trivial BatchNorm running statistics (mean ``N(0, 0.09)``,
    variance ``var_min + U(0, 1)``), drawn from ``g`` in module order."""
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + var_min)
    return net


def self_labelled_points(net: CertifiableNet, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uniform inputs of the net's shape, labelled with the net's own predictions."""
    spec = net.input_spec
    x = torch.rand(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, net(x).argmax(1)


def frozen_batch_stats_copy(net: nn.Module, ref: torch.Tensor) -> nn.Module:
    """An eval-mode copy whose BatchNorm running statistics are the (biased) batch statistics of
    ``ref``: an implementation-independent oracle for train-mode BatchNorm bounds."""
    twin = copy.deepcopy(net)
    bns = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    counts = []  # values per channel seen by each BatchNorm
    hooks = [m.register_forward_hook(lambda mod, i, o: counts.append(i[0].numel() // i[0].shape[1])) for m in bns]
    for m in bns:
        m.momentum = 1.0  # running statistics := this batch's statistics
    twin.train()
    with torch.no_grad():
        twin(ref)
    for h in hooks:
        h.remove()
    for m, n in zip(bns, counts):  # torch stores the unbiased variance; the pass normalised with the biased one
        m.running_var.mul_((n - 1) / n)
    return twin.eval()


def sample_box(lower: torch.Tensor, upper: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` uniform points of the box plus corners: all of them when the input has <= 10
    dimensions, otherwise ``n`` random corners. Returns [m, *shape]."""
    g = torch.Generator().manual_seed(seed)
    shape = lower.shape
    d = lower.numel()
    u = torch.rand((n, *shape), generator=g)
    pts = lower + u * (upper - lower)
    if d <= 10:
        idx = torch.arange(2 ** d).unsqueeze(1)
        bits = ((idx >> torch.arange(d)) & 1).bool().view(-1, *shape)
    else:
        bits = torch.rand((n, *shape), generator=g) < 0.5
    corners = torch.where(bits, upper.expand_as(bits), lower.expand_as(bits))
    return torch.cat([pts, corners])


def reference_cases() -> dict:
    meta = json.loads((SHARED / "lirpa_bounds.json").read_text())
    arrays = np.load(SHARED / "lirpa_bounds.npz")
    cases = {}
    for name, info in meta.items():
        layers = []
        for L in info["layers"]:
            t = L["type"]
            if t == "normalize":
                layers.append(Normalize(L["mean"], L["std"]))
            elif t == "flatten":
                layers.append(nn.Flatten())
            elif t == "linear":
                layers.append(nn.Linear(L["in"], L["out"]))
            elif t == "relu":
                layers.append(nn.ReLU())
            elif t == "conv2d":
                layers.append(nn.Conv2d(L["in"], L["out"], L["kernel"], stride=L["stride"], padding=L["padding"]))
            elif t == "batchnorm2d":
                layers.append(nn.BatchNorm2d(L["features"]))
            elif t == "batchnorm1d":
                layers.append(nn.BatchNorm1d(L["features"]))
            else:
                raise ValueError(t)
        seq = nn.Sequential(*layers)
        prefix = f"{name}/weights/"
        state = {k[len(prefix):]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith(prefix)}
        seq.load_state_dict(state, strict=False)
        c, h, w = info["input_shape"]
        spec = InputSpec(c, h, 10, tuple(L0 for L0 in info["layers"][0]["mean"]), tuple(info["layers"][0]["std"]))
        net = CertifiableNet(nn.Sequential(*list(seq)[:-1]), list(seq)[-1], arch=name, input_spec=spec).eval()
        exp = {k.split("/")[-1]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith(f"{name}/expected/")}
        cases[name] = dict(net=net, eps=info["eps"], x=torch.from_numpy(arrays[f"{name}/x"]),
                           y=torch.from_numpy(arrays[f"{name}/y"]).long(), expected=exp)
    return cases


@pytest.fixture(scope="session")
def lirpa_cases():
    if not (SHARED / "lirpa_bounds.json").exists():
        pytest.fail(f"reference bounds not found at {SHARED}")
    return reference_cases()


def relu_inputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ReLU of ``net.layers()`` (forward order) on the batch ``x``: an oracle for
    pre-activation bounds. Use an eval-mode net (or :func:`frozen_batch_stats_copy`)."""
    out = []
    a = x
    for m in net.layers():
        if isinstance(m, nn.ReLU):
            out.append(a)
        a = m(a)
    return out
