"""PGD (Madry et al. 2018) under the l_inf threat model, with random start and restarts."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from certdist.threats import ThreatModel


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``max_{j != y} z_j - z_y`` (positive when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    return other.max(dim=1).values - true


LOSSES = {
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
    "margin": margin_loss,
}


@contextlib.contextmanager
def attack_mode(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Inside: the model in eval mode (train mode with ``train``), gradients enabled for inputs but
    not accumulated into parameters. Each module's mode and ``requires_grad`` are restored after."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    model.train(train)
    for p, _ in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req in params:
            p.requires_grad_(req)


def uniform_in_box(x: torch.Tensor, box, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the box around ``x``."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
        else torch.rand_like(x)
    return (box.lower + u * (box.upper - box.lower)).detach()


def keep_worst(score: torch.Tensor, z: torch.Tensor, best_score: torch.Tensor, best: torch.Tensor):
    """Per sample, keep ``z`` where its ``score`` beats ``best_score``."""
    better = score > best_score
    view = (-1,) + (1,) * (z.dim() - 1)
    return torch.where(better, score, best_score), torch.where(better.view(view), z.detach(), best)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int = 40,
        restarts: int = 1, step_size: float | None = None, loss: str = "ce", random_start: bool = True,
        eps: float | None = None, relative_step: bool = False, train_mode: bool = False,
        generator: torch.Generator | None = None, include_clean: bool = True) -> torch.Tensor:
    """The worst point found (highest margin loss over all steps and restarts) for each sample.

    ``step_size`` is absolute (pixel units) unless ``relative_step``, then it multiplies eps
    (the expressive-losses convention ``step = step_size * eps``). Default ``2.5 * eps / steps``.
    The model runs in eval mode unless ``train_mode`` (certified training attacks the train-mode
    net); its own modes are restored afterwards. The result always lies in the box and in
    the data range; gradients with respect to the parameters are not accumulated. With
    ``include_clean`` the clean input is a candidate too (evaluation); training attacks skip it
    to save a forward pass.
    """
    e = threat.eps if eps is None else eps
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; known: {', '.join(LOSSES)}")
    if step_size is None:
        alpha = 2.5 * e / max(steps, 1)
    else:
        alpha = step_size * e if relative_step else step_size
    box = threat.box(x, e)
    loss_fn = LOSSES[loss]
    x = x.detach()
    best = x.clone()
    with attack_mode(model, train_mode):
        if include_clean:
            with torch.no_grad():
                best_score = margin_loss(model(x), y)
        else:
            best_score = torch.full(y.shape, -float("inf"), device=x.device)
        for _ in range(restarts):
            xa = uniform_in_box(x, box, generator) if random_start and e > 0 else x.clone()
            for step in range(steps + 1):
                xa.requires_grad_(True)
                logits = model(xa)
                best_score, best = keep_worst(margin_loss(logits.detach(), y), xa, best_score, best)
                if step == steps:
                    break
                grad, = torch.autograd.grad(loss_fn(logits, y).sum(), xa)
                xa = torch.max(torch.min(xa.detach() + alpha * grad.sign(), box.upper), box.lower)
    return best.detach()


def search_counterexample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, steps: int,
                          restarts: int = 1, loss: str = "margin", step_size: float | None = None,
                          generator: torch.Generator | None = None, deadline: float = float("inf")
                          ) -> tuple[torch.Tensor | None, int, bool]:
    """Falsification of one point ``x`` [1, ...] with label ``y`` [1]: ``restarts`` PGD runs from uniform
    random starts, batched, that stop at the first step where a copy is misclassified (its argmax is not ``y``).

    Returns ``(x_adv, steps_done, capped)``: the first misclassified point found ([1, ...], inside the box
    and the data range; the caller validates it) or None; the PGD steps taken (per copy); ``capped``: the
    wall-clock ``deadline`` (``time.monotonic()``) stopped the search before its ``steps``. Without the
    cap the result depends only on the inputs and the generator, not on the machine's speed or load."""
    import time
    if x.shape[0] != 1 or steps < 0 or restarts < 1:
        raise ValueError(f"need one point, steps >= 0 and restarts >= 1; got {tuple(x.shape)}, {steps}, {restarts}")
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; known: {', '.join(LOSSES)}")
    alpha = 2.5 * threat.eps / max(steps, 1) if step_size is None else step_size
    box = threat.box(x)
    xs, ys = x.detach().expand(restarts, *x.shape[1:]), y.expand(restarts)
    lo, hi = box.lower.expand_as(xs), box.upper.expand_as(xs)
    xa = lo + torch.rand(xs.shape, generator=generator, device=x.device, dtype=x.dtype) * (hi - lo)
    loss_fn = LOSSES[loss]
    with attack_mode(model):
        for step in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            logits = model(xa)
            hit = torch.nonzero(logits.detach().argmax(1) != ys).flatten()  # ties count as argmax does
            if hit.numel():
                return xa[hit[:1]].detach(), step, False
            if step == steps:
                break
            if time.monotonic() > deadline:
                return None, step, True
            grad, = torch.autograd.grad(loss_fn(logits, ys).sum(), xa)
            xa = torch.max(torch.min(xa.detach() + alpha * grad.sign(), hi), lo)
    return None, steps, False
