"""The per-batch objective: one function for every training method.

It gathers what the chosen method needs (adversarial point, IBP or CROWN-IBP bounds, teacher
features) and hands it to the pure losses in :mod:`certdist.losses`. The loop does not know which
method runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certdist.attacks.pgd import pgd
from certdist.bounds import Interval
from certdist.config import METHOD_REGISTRY, RunConfig, get_method
from certdist.losses import certified as L
from certdist.losses.distillation import (apply_scaling, box_decomposition, default_beta, distillation_loss,
                                          point_distance_loss, scaling_statistics, soft_label_kl)
from certdist.models.layers import Normalize
from certdist.propagation.ibp import frozen_bn_stats, linear_interval, linear_spec_interval, propagate
from certdist.specs import full_margin_matrix
from certdist.threats import ThreatModel
from certdist.training.regularizers import l1_penalty, shi_regularizer

# read from the method registry (certdist.config.METHOD_REGISTRY)
ATTACK_METHODS = tuple(name for name, m in METHOD_REGISTRY.items() if m.attack)
CERTIFIED_METHODS = tuple(name for name, m in METHOD_REGISTRY.items() if m.certified)

# the loss of each certified method on (logits at the attack point, lower bounds of the logit differences,
# targets, alpha); a registered certified method without one fails loudly in compute_loss
CERTIFIED_LOSSES = {
    "ibp": lambda logits_adv, zd_lb, y, alpha: L.ibp_loss(zd_lb, y),
    "crown-ibp": lambda logits_adv, zd_lb, y, alpha: L.ibp_loss(zd_lb, y),
    "sabr": lambda logits_adv, zd_lb, y, alpha: L.ibp_loss(zd_lb, y),  # the bound of SABR's small box
    "cc-ibp": L.cc_ibp_loss,
    "mtl-ibp": L.mtl_ibp_loss,
    "exp-ibp": L.exp_ibp_loss,
}


@dataclass(frozen=True)
class StepContext:
    """What the schedules say for this step."""
    eps: float            # current training eps
    eps_final: float      # the training eps at the end of the ramp
    reg_scale: float      # weight of the Shi et al. regulariser at this step (0 outside the ramp)
    crown_beta: float     # CROWN-IBP mixing coefficient
    dist_scale: float = 1.0  # factor on the distillation weight beta (distill.beta_schedule)


@dataclass
class Teacher:
    """A frozen teacher: features (or logits) of the clean input, never a backward pass."""
    model: nn.Module
    projection: nn.Module | None = None
    cache: torch.Tensor | None = None        # [N, d] per training example
    cached: torch.Tensor | None = None       # [N] bool
    shift: torch.Tensor | None = None        # scale-free targets: (t - shift) / scale, from the teacher's
    scale: torch.Tensor | None = None        # training-set statistics (distill.features)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, idx: torch.Tensor | None, level: str) -> torch.Tensor:
        use_cache = self.cache is not None and idx is not None
        if use_cache and bool(self.cached[idx].all()):
            return self.cache[idx]
        logits, feats = self.model.forward_with_features(x)
        out = feats if level == "features" else logits
        if use_cache:
            self.cache[idx] = out.to(self.cache.dtype)
            self.cached[idx] = True
        return out


def attack_point(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    a = cfg.attack
    threat = ThreatModel(eps)
    return pgd(model, x, y, threat, steps=a.steps, restarts=a.restarts, step_size=a.step_size, relative_step=True,
               random_start=a.random_start, eps=eps * a.eps_factor, train_mode=a.train_mode,
               include_clean=False)


def sabr_box(x: torch.Tensor, x_adv: torch.Tensor, eps: float, lam: float) -> Interval:
    """SABR's small box: radius ``lam * eps`` around the attack point, moved to lie in the original box."""
    r = lam * eps
    c = torch.max(torch.min(x_adv, x + eps - r), x - eps + r)
    return Interval((c - r).clamp(0, 1), (c + r).clamp(0, 1))


def _pre_relu(layers: list[nn.Module], intervals: list[Interval]) -> list[Interval]:
    return [intervals[i - 1] for i, m in enumerate(layers) if isinstance(m, nn.ReLU) and i > 0]


def compute_loss(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext,
                 teacher: Teacher | None = None, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of ``cfg.method`` on the batch ``(x, y)`` at the schedule's state ``ctx``, and its statistics:
    ``clean_acc`` (the batch's accuracy on the clean inputs, every step), ``adv_acc`` (at the attack point),
    ``cert`` (the IBP / CROWN-IBP-certified fraction), the loss terms and diagnostics."""
    method = cfg.method
    spec = get_method(method)
    stats: dict[str, float] = {}
    eps = ctx.eps
    distill = teacher is not None
    if not spec.uses_eps or (eps == 0 and spec.certified):
        logits, feats = model.forward_with_features(x)
        loss = L.standard_loss(logits, y)
        stats["clean_acc"] = _accuracy(logits, y)
        if distill:  # the clean point is the adversarial point and its own box
            stats["cert_loss"] = loss.item()
            loss = loss + _distill_term(cfg, ctx, model, x, idx, None, feats, logits, Interval.point(feats),
                                        teacher, stats, y, None)
        return _finish(cfg, model, loss, stats)

    if not spec.certified:  # adversarial training (PGD-AT)
        with frozen_bn_stats(model):  # the attack's iterates leave no trace in the running statistics
            x_adv = attack_point(cfg, model, x, y, eps) if eps > 0 else x
        logits = model(x_adv)
        stats["adv_acc"] = _accuracy(logits, y)
        stats["clean_acc"] = stats["adv_acc"] if eps == 0 else _clean_accuracy(model, x, y)
        return _finish(cfg, model, L.standard_loss(logits, y), stats)

    if method not in CERTIFIED_LOSSES:
        raise ValueError(f"method {method!r} is registered as certified but has no loss in "
                         f"certdist.training.objective.CERTIFIED_LOSSES (known: {', '.join(CERTIFIED_LOSSES)})")
    # BatchNorm running statistics come from the clean batch only (updated inside propagate);
    # the passes on adversarial points normalise with their own batch statistics but record nothing
    with frozen_bn_stats(model):
        x_adv = attack_point(cfg, model, x, y, eps) if spec.attack else None
    box = sabr_box(x, x_adv, eps, cfg.sabr_lambda) if method == "sabr" else ThreatModel(eps).box(x)
    layers = list(model.features)
    need_all = ctx.reg_scale > 0 and cfg.reg_weight > 0
    res = propagate(layers, box, ref=x, return_all=need_all, update_bn_stats=True)
    feat_box, inter = res if need_all else (res, None)
    C = full_margin_matrix(y, model.num_classes)
    zd_lb = linear_spec_interval(model.head, feat_box, C).lower
    if method == "crown-ibp" and ctx.crown_beta > 0:
        from certdist.propagation import crown
        crown_lb = crown(model, x, ThreatModel(eps), C=C, intermediate="ibp", ref=x, bound_upper=False,
                         batch_stats=True).lower
        zd_lb = L.mix_bounds(crown_lb, zd_lb, ctx.crown_beta)
    stats["cert"] = (zd_lb >= 0).all(dim=1).float().mean().item() if method != "sabr" else float("nan")

    logits_adv = feats_adv = None
    if x_adv is not None and method != "sabr":
        with frozen_bn_stats(model):
            logits_adv, feats_adv = model.forward_with_features(x_adv)
        stats["adv_acc"] = _accuracy(logits_adv, y)
    stats["clean_acc"] = _clean_accuracy(model, x, y)
    loss = CERTIFIED_LOSSES[method](logits_adv, zd_lb, y, cfg.alpha)

    stats["cert_loss"] = loss.item()
    with torch.no_grad():  # diagnostics: the student's feature boxes and feature norms
        stats["feat_width"] = (feat_box.upper - feat_box.lower).mean().item()
        if feats_adv is not None:
            stats["feat_norm"] = feats_adv.flatten(1).norm(dim=1).mean().item()

    if need_all:
        # the input box in the network's (normalised) units, as in Shi et al.'s code
        in_box = inter[0] if isinstance(layers[0], Normalize) else box
        reg = shi_regularizer(in_box, _pre_relu(layers, inter), cfg.reg_tol)
        loss = loss + cfg.reg_weight * ctx.reg_scale * reg
        stats["reg"] = reg.item()

    if distill:
        loss = loss + _distill_term(cfg, ctx, model, x, idx, x_adv, feats_adv, logits_adv, feat_box, teacher, stats,
                                    y, zd_lb)
    return _finish(cfg, model, loss, stats)


def _beta(cfg: RunConfig, target: torch.Tensor) -> float:
    return cfg.distill.beta if cfg.distill.beta is not None else default_beta(target.shape[1], cfg.distill.loss)


def _distill_term(cfg, ctx, model, x, idx, x_adv, feats_adv, logits_adv, feat_box, teacher, stats, y,
                  zd_lb) -> torch.Tensor:
    """beta * (the configured distillation loss); logs its parts for the diagnosis. ``zd_lb``: the
    certified loss's lower bounds of the logit differences (None at eps 0, where the box is the point)."""
    d = cfg.distill
    if ctx.dist_scale == 0:  # switched off by the beta schedule: no teacher pass
        return torch.zeros((), device=x.device)
    alpha = d.alpha if d.alpha is not None else (cfg.alpha if get_method(cfg.method).alpha else 1.0)
    if feats_adv is None:  # methods without an attack point: the clean point (or SABR's attack point)
        with frozen_bn_stats(model):
            logits_adv, feats_adv = model.forward_with_features(x if x_adv is None else x_adv)
    t_in = x if d.teacher_input == "clean" else (x_adv if x_adv is not None else x)
    target = teacher.targets(t_in, idx if d.teacher_input == "clean" else None, d.level)
    if d.level == "features":
        point, box = feats_adv, feat_box
        if teacher.projection is not None:  # a linear layer: IBP's own rule carries the box
            point, box = teacher.projection(point), linear_interval(teacher.projection, box)
    else:
        point, box = logits_adv, linear_interval(model.head, feat_box)
    stats["teacher_norm"] = target.flatten(1).norm(dim=1).mean().item()
    if d.loss == "kl":
        if d.student == "certified" and zd_lb is not None:  # CC-IBP's pseudo-logits (shift-free softmax)
            point = -L.convex_combination_margins(logits_adv, zd_lb, y, alpha)
        loss = soft_label_kl(point, target, d.temperature)
    else:
        if d.features != "raw":  # both sides scale-free: the teacher by its training-set statistics,
            target = apply_scaling(target, teacher.shift, teacher.scale)  # the student by its batch's (detached)
            s_shift, s_scale = scaling_statistics(point, d.features)
            point, box = apply_scaling(point, s_shift, s_scale), apply_scaling(box, s_shift, s_scale)
        if d.loss == "point":
            loss = point_distance_loss(point, target)
        else:
            loss = distillation_loss(point, box, target, alpha)
            stats["dist_centre"], stats["dist_width"] = box_decomposition(point, box, target, alpha)
    w = _beta(cfg, target) * ctx.dist_scale
    stats["dist"] = loss.item()
    stats["dist_weighted"] = w * stats["dist"]
    return w * loss


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def _clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The accuracy of the training network (train mode: BatchNorm normalises with the batch's statistics,
    recording none) on the clean batch: one forward pass without autograd."""
    with frozen_bn_stats(model):
        return _accuracy(model(x), y)


def _finish(cfg: RunConfig, model: nn.Module, loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
    if cfg.l1 > 0:
        loss = loss + cfg.l1 * l1_penalty(model)
    stats["loss"] = loss.item()
    return loss, stats
