"""The stages of the certification pipeline, in order, as one list (:data:`STAGES`).

Every stage is a function ``stage(ctx) -> record | None`` of a :class:`PointContext` (the point, the
networks, the budget and what earlier stages found: the box, the margin matrix, the float32 tolerance,
the best lower bounds, CROWN's pre-activation bounds); a stage that decides the point returns its record,
else None and the next stage runs (:func:`certify_prepared`). The schedule never lets an attack starve the
bounds: clean prediction, the quick attack, IBP and CROWN, the full attack (PGD, then APGD) on what is still
open, alpha-CROWN, then the complete stage; each stage has its own effort budget
(:class:`~certdist.verification.settings.CertifyConfig`), and the wall-clock ``timeout`` is a cap. Every
stage proves by the one rule of :mod:`certdist.verification.soundness`.

To add a stage: write ``stage(ctx)``, put it in :data:`STAGES` where it runs, add its name to
:data:`~certdist.verification.records.STAGE_ORDER` (summary tables) and bump
:data:`~certdist.verification.records.VERIFIER_VERSION`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from certdist.attacks.apgd import apgd
from certdist.attacks.pgd import search_counterexample
from certdist.bounds import Interval
from certdist.models.cnn import check_float32
from certdist.propagation.alpha import alpha_crown
from certdist.propagation.crown import crown
from certdist.propagation.ibp import ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification.bab import bab_verify
from certdist.verification.chain_bab import chain_bab_verify
from certdist.verification.dense import DenseNet, TooLargeError, count_unstable, crown_bounds, dense_from_model
from certdist.verification.milp import milp_verify
from certdist.verification.settings import CertifyConfig
from certdist.verification.soundness import (box_float64, candidate_checker, eval_copy, proved, tolerance,
                                             validate_counterexample)


# ---------------------------------------------------------------------------------------------------
# The networks a point is verified on.

@dataclass
class Verifier:
    """What the pipeline runs on: the eval-mode float32 network that verdicts are about (``net``), its
    float64 copy that every bound is computed on (``net64``), and the dense form for complete
    verification (or a string saying why it is unavailable). Build it with :func:`prepare_verifier`."""

    net: nn.Module
    net64: nn.Module
    dense: DenseNet | str


def prepare_verifier(model: nn.Module, input_shape: tuple[int, ...], cfg: CertifyConfig,
                     dense: DenseNet | str | None = None) -> Verifier:
    """Eval-mode copies of ``model`` (float32 and float64) and its dense form (``dense`` if given).
    Raises ValueError on a model that is not float32."""
    from certdist.models.support import check_supported
    check_supported(model, input_shape)  # the layer-support contract, before any stage runs or record is written
    check_float32(model, "certify")
    net = eval_copy(model)
    net64 = copy.deepcopy(net).double()
    return Verifier(net, net64, dense_or_reason(net, input_shape, cfg) if dense is None else dense)


def dense_or_reason(model: nn.Module, input_shape: tuple[int, ...], cfg: CertifyConfig) -> DenseNet | str:
    if cfg.complete == "none":
        return "complete verification disabled"
    try:
        return dense_from_model(model, input_shape, cfg.max_dense_weights)
    except (TooLargeError, TypeError) as e:
        return f"complete verification unavailable: {e}"


def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    with torch.no_grad():
        return int(model(x).shape[1])


# ---------------------------------------------------------------------------------------------------
# One point: its budget and its record.

@dataclass
class Point:
    """A point under way: its deadline (the wall-clock cap), the margins and the work spent per stage."""
    index: int
    label: int
    start: float
    deadline: float
    margins: dict[str, float | None]
    stage: str = ""
    message: str = ""
    effort: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    capped: str = ""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spend(self, stage: str, **work: int) -> None:
        """Add ``work`` (attack steps, bound passes, domains, ...) to ``stage``'s effort."""
        mine = self.effort.setdefault(stage, {})
        for k, v in work.items():
            mine[k] = mine.get(k, 0) + int(v)

    def cap(self, stage: str) -> None:
        """The wall-clock cap stopped ``stage`` before its effort budget was spent."""
        self.capped = self.capped or stage
        self.message = (self.message + "; " if self.message else "") + f"wall-clock cap reached in {stage}"


@contextlib.contextmanager
def _timed(p: Point, stage: str) -> Iterator[None]:
    p.stage = stage
    t0 = time.monotonic()
    try:
        yield
    finally:
        p.seconds[stage] = p.seconds.get(stage, 0.0) + time.monotonic() - t0


def finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def point_record(p: Point, status: str, stage: str, cfg: CertifyConfig, eps: float, pred: int | None,
            cex: torch.Tensor | None = None, model: nn.Module | None = None, **extra: Any) -> dict[str, Any]:
    rec = {"index": p.index, "label": p.label, "status": status, "stage": stage,
           "time_s": round(time.monotonic() - p.start, 6), "eps": eps, "pred": pred,
           "margins": {k: finite_or_none(v) if v is not None else None for k, v in p.margins.items()}}
    if p.effort:
        rec["effort"] = p.effort
    if p.seconds:
        rec["stage_time_s"] = {k: round(v, 6) for k, v in p.seconds.items()}
    if p.capped:
        rec["capped"] = p.capped
    if cex is not None:
        with torch.no_grad():
            rec["adv_pred"] = int(model(cex).argmax(1))
        rec["counterexample"] = cex[0].tolist()
        if cfg.counterexample_dir:
            os.makedirs(cfg.counterexample_dir, exist_ok=True)
            path = Path(cfg.counterexample_dir) / f"{p.index}.pt"
            torch.save(cex[0].clone(), path)
            rec["counterexample_file"] = str(path)
    if p.message:
        rec["message"] = p.message
    rec.update(extra)
    return rec


def _generator(x: torch.Tensor, cfg: CertifyConfig, index: int, k: int) -> torch.Generator:
    """The attacks' random numbers: a function of the seed, the point and the attack (never of time)."""
    return torch.Generator(device=x.device).manual_seed(cfg.seed * 1_000_003 + index * 31 + k)


@dataclass
class PointContext:
    """What the stages of one point share: the point (``x`` [1, C, H, W], label ``y``), the networks
    (``v``), the threat model and settings, the budget (``p``), the clean prediction, and what the bound
    stage sets for the later ones: the float32 box in float64 (``box64``, which the bound functions take
    as their ``box``), ``x64``, the margin matrix ``C`` [1, S, K], the float32 tolerance ``tol`` [S], the
    best lower bound per row ``best`` [S] and CROWN's pre-activation bounds per ReLU ``pre`` (None when
    CROWN did not run)."""

    v: Verifier
    x: torch.Tensor
    y: int
    threat: ThreatModel
    cfg: CertifyConfig
    p: Point
    y_t: torch.Tensor
    pred: int | None = None
    box64: Interval | None = None
    x64: torch.Tensor | None = None
    C: torch.Tensor | None = None
    tol: torch.Tensor | None = None
    best: torch.Tensor | None = None
    pre: list[Interval] | None = None

    def record(self, status: str, stage: str, cex: torch.Tensor | None = None, **extra: Any) -> dict[str, Any]:
        """The point's record; from the bound stage on it carries the float32 tolerance as it stands."""
        fp = {} if self.tol is None else {"fp32_tol": finite_or_none(float(self.tol.max()))}
        return point_record(self.p, status, stage, self.cfg, self.threat.eps, self.pred, cex, self.v.net, **fp, **extra)


# ---------------------------------------------------------------------------------------------------
# The stages: ``stage(ctx) -> record | None``.

def clean_stage(ctx: PointContext) -> dict[str, Any] | None:
    """The eval-mode float32 network misclassifies ``x``: ``misclassified``."""
    with torch.no_grad():
        ctx.pred = int(ctx.v.net(ctx.x).argmax(1))
    return ctx.record("misclassified", "clean") if ctx.pred != ctx.y else None


def quick_attack_stage(ctx: PointContext) -> dict[str, Any] | None:
    """Cheap falsification before any bound (``attack-quick``): ``falsified``."""
    cex = _quick_attack(ctx.v.net, ctx.x, ctx.y_t, ctx.threat, ctx.cfg, ctx.p)
    return None if cex is None else ctx.record("falsified", "attack-quick", cex)


def bound_stage(ctx: PointContext) -> dict[str, Any] | None:
    """IBP, then CROWN, over the float32 box in float64 (``ibp`` / ``crown``): ``verified``. Sets the box,
    the margin matrix, the float32 tolerance, the best bounds and CROWN's pre-activation bounds."""
    ctx.box64, ctx.x64 = box_float64(ctx.threat, ctx.x), ctx.x.to(torch.float64)
    ctx.C = margin_matrix(ctx.y_t, num_classes_of(ctx.v.net, ctx.x)).to(torch.float64)
    tol = tolerance(ctx.v.net64, ctx.box64, ctx.C)[0]
    proved_by, ctx.best, ctx.pre, ctx.tol = _ibp_crown(ctx.v.net64, ctx.x64, ctx.threat, ctx.box64, ctx.C, tol, ctx.p)
    return None if proved_by is None else ctx.record("verified", proved_by)


def full_attack_stage(ctx: PointContext) -> dict[str, Any] | None:
    """The full attack (``attack`` -> ``apgd``) on a point the bounds left open, while time is left:
    ``falsified``."""
    if ctx.p.left() <= 0:
        return None
    cex, stage = _full_attack(ctx.v.net, ctx.x, ctx.y_t, ctx.threat, ctx.cfg, ctx.p)
    return None if cex is None else ctx.record("falsified", stage, cex)


def alpha_crown_stage(ctx: PointContext) -> dict[str, Any] | None:
    """alpha-CROWN from CROWN's intermediate bounds (``alpha-crown``): ``verified``."""
    done, ctx.best = _alpha_stage(ctx.v.net64, ctx.x64, ctx.threat, ctx.box64, ctx.C, ctx.best, ctx.tol, ctx.pre,
                                  ctx.cfg, ctx.p)
    return ctx.record("verified", "alpha-crown") if done else None


def complete_stage(ctx: PointContext) -> dict[str, Any]:
    """Complete verification of the rows still open (``milp``, ``bab`` or ``chain-bab``, chosen by
    ``cfg.complete``): ``verified`` / ``falsified``, else ``unknown``. Always decides the point."""
    p, pre = ctx.p, ctx.pre
    unstable = None if pre is None else count_unstable([b.lower for b in pre], [b.upper for b in pre])
    method, why = _complete_method(ctx.cfg, ctx.v.dense, unstable)
    if method is None:
        p.message = (p.message + "; " if p.message else "") + why
        return ctx.record("unknown", p.stage)
    if p.left() <= 0:
        p.cap(p.stage)
        return ctx.record("unknown", p.stage)
    open_rows = ~proved(ctx.best, ctx.tol)  # NaN-safe: a row is dropped only when it is proved
    rows = (ctx.C[0][open_rows], ctx.tol[open_rows])
    done = None
    if method != "chain-bab":
        done = _complete(ctx.v.net, ctx.v.dense, ctx.x, ctx.y, ctx.threat, *rows, ctx.cfg, p, method)
    if done is None:  # chain-bab, or "auto" with too many unstable ReLUs for the MILP
        done = _chain_complete(ctx.v.net, ctx.x, ctx.y, ctx.threat, ctx.box64, *rows, ctx.cfg, p, pre)
    status, stage, cex, extra = done
    return ctx.record(status, stage, cex, **extra)


Stage = Callable[[PointContext], "dict[str, Any] | None"]

# The pipeline, in order: the first stage that returns a record decides the point.
STAGES: tuple[Stage, ...] = (clean_stage, quick_attack_stage, bound_stage, full_attack_stage, alpha_crown_stage,
                             complete_stage)


def certify_prepared(v: Verifier, x: torch.Tensor, y: int, threat: ThreatModel, cfg: CertifyConfig,
                     index: int = 0) -> dict[str, Any]:
    """The pipeline (:data:`STAGES`) on one point ``x`` [1, C, H, W] with label ``y``, on networks built
    by :func:`prepare_verifier` (call inside :func:`~certdist.propagation.ibp.exact_fp32`)."""
    start = time.monotonic()
    p = Point(index, int(y), start, start + cfg.timeout, {})
    ctx = PointContext(v, x, int(y), threat, cfg, p, torch.tensor([int(y)], device=x.device))
    for stage in STAGES:
        rec = stage(ctx)
        if rec is not None:
            return rec
    return ctx.record("unknown", p.stage)  # not reached: the complete stage decides every point it sees


# ---------------------------------------------------------------------------------------------------
# The work of the stages.

def _quick_attack(model, x, y_t, threat, cfg: CertifyConfig, p: Point) -> torch.Tensor | None:
    """Cheap falsification before any bound: ``quick_restarts`` batched PGD runs of ``quick_attack_steps``
    steps (at most ``attack_steps``: 0 turns every attack off) on the margin loss, stopping at the first misclassified step; the validated counterexample."""
    steps = min(cfg.quick_attack_steps, cfg.attack_steps)  # attack_steps=0: no attack at all
    if steps == 0:
        return None
    with _timed(p, "attack-quick"):
        cand, steps, capped = search_counterexample(
            model, x, y_t, threat, steps, cfg.quick_restarts, "margin",
            generator=_generator(x, cfg, p.index, 0), deadline=p.deadline)
        p.spend("attack-quick", attack_steps=steps * cfg.quick_restarts)
        if capped:
            p.cap("attack-quick")
        return cand if cand is not None and validate_counterexample(model, cand, x, int(y_t), threat) else None


def _full_attack(model, x, y_t, threat, cfg: CertifyConfig, p: Point) -> tuple[torch.Tensor | None, str]:
    """The full attack on a point the bounds left open: PGD (``restarts`` batched runs of ``attack_steps``
    steps per loss in ``attack_losses``), then APGD-DLR (``apgd_restarts`` x ``attack_steps``; needs 3
    classes). Its wall clock is capped at ``attack_share`` of the timeout. Returns (the validated
    counterexample or None, the stage that found it)."""
    deadline = min(p.deadline, time.monotonic() + cfg.attack_share * cfg.timeout)
    with _timed(p, "attack"):
        for k, loss in enumerate(cfg.attack_losses, start=1):
            if cfg.attack_steps == 0:
                break
            cand, steps, capped = search_counterexample(model, x, y_t, threat, cfg.attack_steps, cfg.restarts, loss,
                                                        generator=_generator(x, cfg, p.index, k), deadline=deadline)
            p.spend("attack", attack_steps=steps * cfg.restarts)
            if cand is not None and validate_counterexample(model, cand, x, int(y_t), threat):
                return cand, "attack"
            if capped:
                p.cap("attack")
                return None, "attack"
    if not (cfg.apgd_restarts and cfg.attack_steps and num_classes_of(model, x) >= 3):
        return None, "attack"
    if time.monotonic() > deadline:
        p.cap("apgd")
        return None, "apgd"
    with _timed(p, "apgd"):
        g = _generator(x, cfg, p.index, len(cfg.attack_losses) + 1)
        x_adv = apgd(model, x, y_t, threat, steps=cfg.attack_steps, loss="dlr", restarts=cfg.apgd_restarts,
                     generator=g, deadline=deadline)
        p.spend("apgd", attack_steps=cfg.attack_steps * cfg.apgd_restarts)
        if time.monotonic() > deadline:
            p.cap("apgd")
    return (x_adv if validate_counterexample(model, x_adv, x, int(y_t), threat) else None), "apgd"


def _ibp_crown(net64, x64, threat, box: Interval, C, tol, p: Point
               ) -> tuple[str | None, torch.Tensor, list[Interval] | None, torch.Tensor]:
    """IBP, then CROWN (intermediate bounds "best": CROWN where IBP leaves neurons unstable, intersected
    with IBP), in float64 over ``box`` (the float32 box in float64). Returns (proving stage or None, best
    lower bound per row [S], CROWN's pre-activation bounds per ReLU or None, the float32 tolerance per row
    [S]). ``tol`` (from IBP's activation ranges) is tightened with CROWN's: both are sound, so is their
    minimum. A stage proves the point when every row is proved."""
    with _timed(p, "ibp"), torch.no_grad():
        best = _finite_or_minus_inf(ibp(net64, x64, threat, C=C, box=box).lower[0])
        p.spend("ibp", bound_passes=1)
    p.margins["ibp"] = float(best.min())
    if proved(best, tol).all():
        return "ibp", best, None, tol
    if p.left() <= 0:
        p.cap("ibp")
        return None, best, None, tol
    with _timed(p, "crown"), torch.no_grad():
        out, pre = crown(net64, x64, threat, C=C, intermediate="best", bound_upper=False, return_intermediate=True,
                         box=box)
        p.spend("crown", bound_passes=1)
        tol = torch.minimum(tol, tolerance(net64, box, C, relu_bounds=pre)[0])
    low = _finite_or_minus_inf(out.lower[0].detach())
    p.margins["crown"] = float(low.min())
    best = torch.maximum(best, low)
    return ("crown" if proved(best, tol).all() else None), best, pre, tol


def _alpha_stage(net64, x64, threat, box: Interval, C, best, tol, pre, cfg: CertifyConfig, p: Point
                 ) -> tuple[bool, torch.Tensor]:
    """alpha-CROWN (``alpha_iterations`` steps) from CROWN's intermediate bounds; (proved, best lower bound)."""
    if cfg.alpha_iterations == 0:
        return False, best
    if p.left() <= 0:
        p.cap("alpha-crown")
        return False, best
    with _timed(p, "alpha-crown"), torch.no_grad():
        out = alpha_crown(net64, x64, threat, C=C, iterations=cfg.alpha_iterations, lr=cfg.alpha_lr,
                          intermediate="crown", intermediate_bounds=pre, bound_upper=False, box=box)
        p.spend("alpha-crown", bound_passes=cfg.alpha_iterations)
    low = _finite_or_minus_inf(out.lower[0].detach())
    p.margins["alpha-crown"] = float(low.min())
    best = torch.maximum(best, low)
    return bool(proved(best, tol).all()), best


def _finite_or_minus_inf(bound: torch.Tensor) -> torch.Tensor:
    """A NaN lower bound (overflow in the bound arithmetic) proves nothing: treat it as -inf."""
    return torch.nan_to_num(bound, nan=-float("inf"), posinf=-float("inf"))


def _complete_method(cfg: CertifyConfig, dense: DenseNet | str, unstable: int | None) -> tuple[str | None, str]:
    """The complete verifier a point goes to (``milp``, ``bab``, ``chain-bab``) or (None, why not).
    ``unstable``: the point's unstable ReLUs after CROWN (None: not known yet, the dense form counts
    them). ``auto`` takes the exact MILP when it is small enough, else branch and bound on the layer
    chain, which explores far more domains per second than the dense BaB on conv nets (docs/results.md)."""
    if cfg.complete == "none":
        return None, "complete verification disabled"
    has_dense = not isinstance(dense, str)
    if cfg.complete == "milp":
        return ("milp", "") if has_dense else (None, str(dense))
    if cfg.complete == "bab":
        return ("bab" if has_dense else "chain-bab"), ""
    if cfg.complete == "chain-bab" or not has_dense:
        return "chain-bab", ""
    if unstable is None:
        return "auto", ""  # the dense form counts the unstable ReLUs
    return ("milp" if unstable <= cfg.milp_max_unstable else "chain-bab"), ""


def _complete(model, dense: DenseNet, x, y: int, threat, C_rows, tol_rows, cfg: CertifyConfig, p: Point,
              method: str):
    """Dense BaB or MILP on the rows not yet proved (``method="auto"``: the MILP if few ReLUs are unstable,
    else None); returns (status, stage, counterexample, extra) or None."""
    box = box_float64(threat, x)
    lo, hi = box.lower.view(1, -1), box.upper.view(1, -1)
    lbs, ubs = crown_bounds(dense, lo, hi)
    lbs, ubs = [l[0] for l in lbs], [u[0] for u in ubs]
    unstable = count_unstable(lbs, ubs)
    if method == "auto":
        if unstable > cfg.milp_max_unstable:
            return None
        method = "milp"
    check = candidate_checker(model, x, y, threat)
    with _timed(p, method):
        if method == "milp":
            res = milp_verify(dense, lo[0], hi[0], C_rows, lbs, ubs, max(p.left(), 1e-3), check, cfg.milp_threads,
                              tol=tol_rows, max_nodes=cfg.milp_max_nodes)
            extra = {"unstable": unstable}
            p.spend(method, rows=int(C_rows.shape[0]))
        else:
            res = bab_verify(dense, lo[0], hi[0], C_rows, max(p.left(), 1e-3), check, batch=cfg.bab_batch,
                             alpha_steps=cfg.bab_alpha_steps, root_bounds=(lbs, ubs), tol=tol_rows,
                             max_domains=cfg.max_domains)
            extra = {"unstable": unstable, "domains": res.domains}
            p.spend(method, domains=res.domains)
    if res.status == "verified":
        p.margins[method] = res.lower
    if res.message:
        p.message = res.message
        if res.message == "time limit":
            p.cap(method)
    return res.status, method, res.counterexample, extra


def _chain_complete(model, x, y: int, threat, box64: Interval, C_rows, tol_rows, cfg: CertifyConfig, p: Point,
                    pre: list[Interval] | None):
    """Branch and bound on the layer chain (``chain_bab``) over the float32 box ``box64``, from the CROWN
    stage's intermediate bounds ``pre`` when it ran; a domain closes only above the largest float32
    tolerance of the open rows (the soundness policy). Returns (status, stage, counterexample, extra)."""
    threshold = float(tol_rows.max()) if tol_rows.numel() else 0.0
    with _timed(p, "chain-bab"):
        res = chain_bab_verify(model, x, threat, C_rows, max(p.left(), 1e-3),
                               candidate_checker(model, x, y, threat), threshold=threshold, batch=cfg.bab_batch,
                               alpha_steps=cfg.chain_bab_alpha_steps, root_bounds=pre, max_domains=cfg.max_domains,
                               box=box64)
        p.spend("chain-bab", domains=res.domains)
    if res.status == "verified":
        p.margins["chain-bab"] = res.lower
    if res.message:
        p.message = res.message
        if res.message == "time limit":
            p.cap("chain-bab")
    extra = {"domains": res.domains}
    if pre is not None:
        extra["unstable"] = count_unstable([b.lower for b in pre], [b.upper for b in pre])
    return res.status, "chain-bab", res.counterexample, extra


__all__ = ["STAGES", "Point", "PointContext", "Verifier", "alpha_crown_stage", "bound_stage", "certify_prepared",
           "clean_stage", "complete_stage", "full_attack_stage", "prepare_verifier", "quick_attack_stage"]
