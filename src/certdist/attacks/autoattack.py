"""AutoAttack (Croce & Hein 2020), standard version, from the maintained ``torchattacks`` package.

The standard version runs, each on the points the previous ones left robust: APGD-CE (100 iterations,
1 restart), APGD-T (100 iterations, 9 target classes), FAB-T (100 iterations, 9 target classes) and
Square (5000 queries), the settings of the reference implementation (fra31/auto-attack,
``version="standard"``). ``torchattacks.AutoAttack`` itself runs its white-box attacks with 10
iterations only, so the same four ``torchattacks`` attacks are assembled here with the reference
iteration counts.

``torchattacks`` is an optional extra: ``pip install --no-deps torchattacks==3.5.1 scipy`` (its
declared torchvision dependency is never imported and would pull another torch build).
"""
from __future__ import annotations

import torch
from torch import nn

from certdist.threats import ThreatModel

AUTOATTACK_DESCRIPTION = ("AutoAttack standard (APGD-CE 100 it., APGD-T 100 it. x 9 targets, FAB-T 100 it. x 9 "
                          "targets, Square 5000 queries; torchattacks {version})")
INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1 scipy"


def _torchattacks():
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError(f"attack 'autoattack' needs the optional torchattacks package ({e}): {INSTALL_HINT}") from e
    return torchattacks


def autoattack_description() -> str:
    return AUTOATTACK_DESCRIPTION.format(version=_torchattacks().__version__)


def standard_attacks(model: nn.Module, eps: float, num_classes: int, seed: int = 0) -> list:
    """The four ``torchattacks`` attacks of the standard AutoAttack, with the reference settings (at most 9
    target classes, whatever the number of classes: torchattacks targets all ``n_classes - 1`` others and
    uses ``n_classes`` for nothing else, so it is capped at 10)."""
    ta = _torchattacks()
    n_classes = min(num_classes, 10)
    return [ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
            ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=seed),
            ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                   n_classes=n_classes, seed=seed),
            ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)]


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, num_classes: int,
               seed: int = 0) -> torch.Tensor:
    """The standard AutoAttack's worst point per sample of ``x`` (floats in [0, 1]), inside the threat box.

    ``model``: the eval-mode network (inputs in [0, 1], normalisation inside). A point the attacks do
    not break is returned unchanged."""
    ta = _torchattacks()
    if (threat.data_min, threat.data_max) != (0.0, 1.0):
        raise ValueError(f"AutoAttack (torchattacks) needs data in [0, 1], the threat model has "
                         f"[{threat.data_min}, {threat.data_max}]")
    if num_classes < 4:  # APGD-T's targeted DLR loss uses the 3rd and 4th largest logits
        raise ValueError(f"AutoAttack (APGD-T, FAB-T) needs at least 4 classes, got {num_classes}; use attack 'apgd'")
    with torch.enable_grad():
        x_adv = ta.MultiAttack(standard_attacks(model, float(threat.eps), num_classes, seed))(x, y)
    # torchattacks clips to eps in float arithmetic; project so that every point counted lies in the box
    return threat.project(x_adv.detach(), x)
