"""Evaluation on a test set: clean accuracy, accuracy under attack and IBP-certified accuracy.

Attacks (``attack_name``): ``"pgd"`` (own PGD, margin loss), ``"apgd"`` (own APGD-CE + APGD-DLR) and
``"autoattack"`` (the standard AutoAttack from the optional ``torchattacks`` package,
:mod:`certdist.attacks.autoattack`). Results name the attack that ran (``attack``, ``attack_desc``).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from certdist.attacks.apgd import apgd_ensemble
from certdist.attacks.pgd import pgd
from certdist.models.cnn import as_certifiable, check_float32
from certdist.models.support import check_supported
from certdist.propagation.ibp import exact_fp32
from certdist.specs import check_labels
from certdist.threats import ThreatModel
from certdist.verification.soundness import ibp_proved


ATTACKS = ("pgd", "apgd", "autoattack")


CERTIFY_CPU_ONLY = ("certify runs on the CPU only for now (its MILP and branch-and-bound stages hand CPU tensors "
                    "to NumPy and HiGHS)")


def check_device(device: str | torch.device, what: str = "evaluate", supported: tuple[str, ...] = ("cpu", "cuda"),
                 reason: str = "") -> torch.device:
    """``device`` as a :class:`torch.device`, checked up front: ValueError when it is not one of
    ``supported`` (device types; ``reason`` says why in the message) or is a CUDA device that this machine
    does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}: unknown device {device!r} (use 'cpu' or 'cuda')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: no CUDA device {dev.index} (this machine has {torch.cuda.device_count()}); "
                             "use device='cuda' or 'cpu'")
    if dev.type not in supported:
        raise ValueError(f"{what}: device {str(dev)!r} is not supported" + (f": {reason}" if reason else "")
                         + "; use " + " or ".join(map(repr, supported)))
    return dev


def attack_description(attack_name: str, steps: int, restarts: int, step_size: float) -> str:
    """A one-line description of the attack that ``evaluate`` runs with these settings."""
    if attack_name == "pgd":
        return f"PGD margin loss, {steps} steps, {restarts} restart(s), step {step_size:g} x eps"
    if attack_name == "apgd":
        return f"APGD-CE + APGD-DLR, {max(steps, 1)} steps each, {restarts} restart(s)"
    from certdist.attacks.autoattack import autoattack_description
    return autoattack_description()


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel,
             pgd_steps: int = 40, pgd_restarts: int = 1, pgd_step_size: float = 0.035, batch_size: int = 500,
             device: str | torch.device = "cpu", progress: bool | None = None, attack: bool = True,
             attack_name: str = "pgd") -> dict:
    """Accuracies (in %) of the eval-mode network; ``images`` uint8 [N,C,H,W] or float in [0, 1].

    ``model``: a :class:`~certdist.models.CertifiableNet` or an ``nn.Sequential`` ending in an ``nn.Linear``.
    ``attack_name="pgd"``: PGD with the margin loss and a step of ``pgd_step_size * eps`` (relative,
    as the expressive-losses code); ``"apgd"``: APGD-CE then APGD-DLR (``pgd_steps`` iterations each);
    ``"autoattack"``: the standard AutoAttack (its own fixed settings; needs ``torchattacks``).
    A point counts as robust only if it is correctly classified and the attack fails; as IBP-certified
    only if it is correctly classified and IBP proves every margin as the certify pipeline does
    (float64 bounds over the float32 box, each above its float32 rounding tolerance). ``robust_acc`` is the
    accuracy under the attack named by ``attack`` / ``attack_desc`` (``pgd_acc`` too when it is PGD).
    ``labels``: integer class indices [N] (ValueError otherwise). ``device``: ``"cpu"`` or ``"cuda"``
    (ValueError when CUDA is not available); a model elsewhere is evaluated as a copy on ``device``, the
    caller's model is not moved. ``progress``: a progress bar; None (default) shows it only when stderr is
    a terminal.
    """
    dev = check_device(device)
    if attack_name not in ATTACKS:
        raise ValueError(f"unknown attack {attack_name!r}; known: {', '.join(ATTACKS)}")
    if images.dtype != torch.uint8 and images.numel() and (images.min() < threat.data_min or images.max() > threat.data_max):
        raise ValueError(f"images must be uint8 or floats in [{threat.data_min}, {threat.data_max}], got values in "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    check_supported(model, tuple(images.shape[1:]))  # the layer-support contract, before any work
    net = as_certifiable(model)
    check_labels(labels, net.num_classes, n=images.shape[0], where="evaluate: labels")
    n = labels.shape[0]
    if n == 0:
        raise ValueError("evaluate: no test points (limit 0 or an empty split)")
    run_attack = attack and threat.eps > 0
    desc = attack_description(attack_name, pgd_steps, pgd_restarts, pgd_step_size) if run_attack else "none"
    check_float32(net, "evaluate")
    if any(t.device != dev for t in [*net.parameters(), *net.buffers()]):
        net = copy.deepcopy(net).to(dev)  # the caller's model stays where it is
    was_training = net.training
    net.eval()
    net64 = copy.deepcopy(net).double()
    clean = adv = cert = 0
    t0 = time.time()
    bar = tqdm(range(0, n, batch_size), desc="evaluate", disable=None if progress is None else not progress,
               leave=False)
    try:
        for s in bar:
            x = images[s:s + batch_size].to(dev)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            y = labels[s:s + batch_size].to(dev)
            with torch.inference_mode(), exact_fp32():
                ok = net(x).argmax(1) == y
                cert_ok = ok & ibp_proved(net64, x, y, threat, net.num_classes)[2]
            clean += int(ok.sum())
            cert += int(cert_ok.sum())
            if run_attack:
                if attack_name == "apgd":
                    xa = apgd_ensemble(net, x, y, threat, steps=max(pgd_steps, 1), restarts=pgd_restarts)
                elif attack_name == "autoattack":
                    from certdist.attacks.autoattack import autoattack
                    xa = autoattack(net, x, y, threat, net.num_classes)
                else:
                    xa = pgd(net, x, y, threat, steps=pgd_steps, restarts=pgd_restarts, step_size=pgd_step_size,
                             relative_step=True, loss="margin")
                with torch.inference_mode():
                    adv_ok = ok & (net(xa).argmax(1) == y)
                adv += int(adv_ok.sum())
            else:
                adv += int(ok.sum())
            bar.set_postfix(clean=f"{100 * clean / min(n, s + batch_size):.1f}")
    finally:
        net.train(was_training)
    settings = {"autoattack": {"version": "standard"},
                "apgd": {"steps": max(pgd_steps, 1), "restarts": pgd_restarts},
                "pgd": {"steps": pgd_steps, "restarts": pgd_restarts, "step_size": pgd_step_size}}[attack_name]
    out = {"n": n, "eps": threat.eps, "clean_acc": 100.0 * clean / n, "robust_acc": 100.0 * adv / n,
           "ibp_cert_acc": 100.0 * cert / n, "attack": attack_name if run_attack else "none", "attack_desc": desc,
           "attack_settings": settings if run_attack else {}, "time_s": round(time.time() - t0, 2)}
    if attack_name == "pgd" and run_attack:
        out["pgd_acc"] = out["robust_acc"]
    return out
