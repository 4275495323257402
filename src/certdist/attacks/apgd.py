"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), l_inf, with the cross-entropy and DLR losses.

``apgd_ensemble`` runs APGD-CE and then APGD-DLR on the points that survived, the two white-box
attacks of AutoAttack's standard version (without FAB-T and Square; not the full AutoAttack).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from certdist.attacks.pgd import attack_mode, keep_worst, margin_loss, uniform_in_box
from certdist.threats import ThreatModel


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: ``-(z_y - max_{i != y} z_i) / (z_(1) - z_(3))`` per sample."""
    srt = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    return -(true - other.max(dim=1).values) / (srt[:, 0] - srt[:, 2] + 1e-12)


def _checkpoints(steps: int) -> list[int]:
    """Iterations at which the step size may be halved: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p if q <= 1})


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int = 100,
         loss: str = "ce", restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
         generator: torch.Generator | None = None, deadline: float = math.inf) -> torch.Tensor:
    """The worst point (largest margin loss) found by APGD; always inside the box and the data range.
    The model runs in eval mode; its modes are restored afterwards. ``deadline`` (``time.monotonic()``):
    a wall-clock cap, checked before every step."""
    if loss not in ("ce", "dlr"):
        raise ValueError(f"unknown APGD loss {loss!r}; known: ce, dlr")
    if steps < 1 or restarts < 1:
        raise ValueError(f"need steps >= 1 and restarts >= 1, got {steps}, {restarts}")
    loss_fn = (lambda z, t: F.cross_entropy(z, t, reduction="none")) if loss == "ce" else dlr_loss
    box = threat.box(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    x = x.detach()
    marks = _checkpoints(steps)
    with attack_mode(model):
        with torch.no_grad():
            best, best_margin = x.clone(), margin_loss(model(x), y)
        for _ in range(restarts):
            cur = uniform_in_box(x, box, generator)
            eta = torch.full((x.shape[0],), 2 * threat.eps, device=x.device, dtype=x.dtype)
            f_cur, grad, logits = _loss_and_grad(model, cur, y, loss_fn)
            best_margin, best = keep_worst(margin_loss(logits, y), cur, best_margin, best)
            f_max, x_max = f_cur.clone(), cur.clone()
            prev = cur.clone()
            successes = torch.zeros_like(eta)
            last_mark, f_max_at_mark, eta_at_mark = 0, f_max.clone(), eta.clone()
            for k in range(steps):
                if time.monotonic() > deadline:
                    break
                z = _project(cur + eta.view(view) * grad.sign(), box)
                a = 1.0 if k == 0 else momentum
                nxt = _project(cur + a * (z - cur) + (1 - a) * (cur - prev), box)
                f_nxt, g_nxt, logits = _loss_and_grad(model, nxt, y, loss_fn)
                best_margin, best = keep_worst(margin_loss(logits, y), nxt, best_margin, best)
                successes += (f_nxt > f_cur).to(eta.dtype)
                improved = f_nxt > f_max
                f_max = torch.where(improved, f_nxt, f_max)
                x_max = torch.where(improved.view(view), nxt, x_max)
                prev, cur, f_cur, grad = cur, nxt, f_nxt, g_nxt
                if k + 1 in marks and k + 1 > last_mark:
                    span = k + 1 - last_mark
                    halve = (successes < rho * span) | ((eta == eta_at_mark) & (f_max == f_max_at_mark))
                    eta = torch.where(halve, eta / 2, eta)
                    cur = torch.where(halve.view(view), x_max, cur)  # halved samples restart from their best
                    if bool(halve.any()):
                        f_cur, grad, _ = _loss_and_grad(model, cur, y, loss_fn)
                    successes.zero_()
                    last_mark, f_max_at_mark, eta_at_mark = k + 1, f_max.clone(), eta.clone()
    return best.detach()


def apgd_ensemble(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int = 100,
                  restarts: int = 1) -> torch.Tensor:
    """APGD-CE, then APGD-DLR on the points APGD-CE did not break; the worst point per sample."""
    x_adv = apgd(model, x, y, threat, steps=steps, loss="ce", restarts=restarts)
    with attack_mode(model), torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    if robust.any():
        idx = robust.nonzero().squeeze(1)
        x_adv[idx] = apgd(model, x[idx], y[idx], threat, steps=steps, loss="dlr", restarts=restarts)
    return x_adv


def _project(z: torch.Tensor, box) -> torch.Tensor:
    return torch.max(torch.min(z, box.upper), box.lower)


def _loss_and_grad(model, z, y, loss_fn):
    """Per-sample loss, its input gradient and the logits (inside :func:`attack_mode`)."""
    z = z.detach().requires_grad_(True)
    logits = model(z)
    per = loss_fn(logits, y)
    grad, = torch.autograd.grad(per.sum(), z)
    return per.detach(), grad.detach(), logits.detach()
