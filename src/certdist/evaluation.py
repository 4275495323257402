"""Evaluation on a test set: clean accuracy, PGD accuracy and IBP-certified accuracy."""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from certdist.attacks.apgd import apgd_ensemble
from certdist.attacks.pgd import pgd
from certdist.propagation.ibp import exact_fp32, ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel,
             pgd_steps: int = 40, pgd_restarts: int = 1, pgd_step_size: float = 0.035, batch_size: int = 500,
             device: str | torch.device = "cpu", progress: bool = True, attack: bool = True,
             attack_name: str = "pgd") -> dict:
    """Accuracies (in %) of the eval-mode network; ``images`` uint8 [N,C,H,W] or float in [0, 1].

    ``attack_name="pgd"``: PGD with the margin loss and a step of ``pgd_step_size * eps`` (relative,
    as the expressive-losses code); ``"apgd"``: APGD-CE then APGD-DLR (``pgd_steps`` iterations each).
    A point counts as robust only if it is correctly classified and the attack fails; as certified
    only if it is correctly classified and the IBP margins are all positive.
    """
    if attack_name not in ("pgd", "apgd"):
        raise ValueError(f"unknown attack {attack_name!r}; known: pgd, apgd")
    if images.dtype != torch.uint8 and images.numel() and (images.min() < threat.data_min or images.max() > threat.data_max):
        raise ValueError(f"images must be uint8 or floats in [{threat.data_min}, {threat.data_max}], got values in "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    n = labels.shape[0]
    if n == 0:
        raise ValueError("evaluate: no test points (limit 0 or an empty split)")
    was_training = model.training
    model.eval()
    clean = adv = cert = 0
    t0 = time.time()
    bar = tqdm(range(0, n, batch_size), desc="evaluate", disable=not progress, leave=False)
    try:
        for s in bar:
            x = images[s:s + batch_size].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            y = labels[s:s + batch_size].to(device)
            with torch.inference_mode(), exact_fp32():
                ok = model(x).argmax(1) == y
                lb = ibp(model, x, threat, C=margin_matrix(y, model.num_classes)).lower
                cert_ok = ok & (lb > 0).all(dim=1)
            clean += int(ok.sum())
            cert += int(cert_ok.sum())
            if attack and threat.eps > 0:
                if attack_name == "apgd":
                    xa = apgd_ensemble(model, x, y, threat, steps=max(pgd_steps, 1), restarts=pgd_restarts)
                else:
                    xa = pgd(model, x, y, threat, steps=pgd_steps, restarts=pgd_restarts, step_size=pgd_step_size,
                             relative_step=True, loss="margin")
                with torch.inference_mode():
                    adv_ok = ok & (model(xa).argmax(1) == y)
                adv += int(adv_ok.sum())
            else:
                adv += int(ok.sum())
            bar.set_postfix(clean=f"{100 * clean / min(n, s + batch_size):.1f}")
    finally:
        model.train(was_training)
    return {"n": n, "eps": threat.eps, "clean_acc": 100.0 * clean / n, "pgd_acc": 100.0 * adv / n,
            "ibp_cert_acc": 100.0 * cert / n, "attack": attack_name, "pgd_steps": pgd_steps, "pgd_restarts": pgd_restarts,
            "time_s": round(time.time() - t0, 2)}
