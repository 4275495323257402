"""The staged certification pipeline: one verdict per test point, written as JSON lines.

Per point, in order (the first conclusive stage ends the point), each stage with its own effort budget
counted in work (attack steps, bound passes, branch-and-bound domains, MILP nodes; :class:`CertifyConfig`),
so that a checkpoint gets the same verdicts on any machine and under any load:

1. ``clean``: the eval-mode network misclassifies ``x`` -> ``misclassified``;
2. ``attack-quick``: a short batched PGD on the margin loss (cheap falsification) -> ``falsified``;
3. ``ibp`` -> ``crown``: every margin proved -> ``verified``;
4. ``attack`` -> ``apgd``: the full attack (PGD on the margin and cross-entropy losses, then APGD-DLR),
   only on the points the bounds left open, its wall clock capped at a share of the timeout -> ``falsified``;
5. ``alpha-crown`` -> ``verified``;
6. complete verification -> ``verified`` / ``falsified``: under ``complete="auto"`` the exact ``milp`` when
   the network has a dense form and few ReLUs are unstable after CROWN, else ``chain-bab`` (branch and
   bound on the layer chain, started from the CROWN stage's intermediate bounds); ``bab`` (dense branch
   and bound), ``milp`` and ``chain-bab`` can be asked for;
7. otherwise ``unknown`` (effort budget spent, the wall-clock cap reached, complete verification
   disabled/unavailable, or margins within the float32 tolerance that no counterexample realises).

The wall-clock ``timeout`` per point stays as a cap: a point that reaches it records ``capped`` (the stage
it stopped) and :func:`summarize` counts such points; only their verdicts can depend on the machine.

Soundness policy (docs/method.md): the bounds are computed in float64 on a float64 copy of the
eval-mode network over the float32 input box, and a margin row counts as proved only when its lower
bound exceeds the row's float32 tolerance (:mod:`certdist.verification.rounding`: how far the float32
network's logits can be from the exact ones anywhere in the box); NaN proves nothing. The same rule
holds in every stage, in the batched pre-pass, in BaB pruning and in the MILP. A network that is not a
fixed function in eval mode (BatchNorm without running statistics) is refused.

Every counterexample (from the attack, BaB or the MILP) is re-checked on the eval-mode float32 torch
model before it is reported: inside the box (tolerance 1e-6), inside the data range and misclassified.
The network is always verified in eval mode, on a copy: the caller's model and its mode are untouched.

Results go to a JSON-lines file, one record per point, flushed as soon as the point is decided; every
record carries the hashes of the model state and of the data, the verdict-relevant settings and the
verifier's version (:data:`VERIFIER_VERSION`), and a rerun skips the points already in the file (resume)
only when all of them match (else it refuses);
``shard=(i, n)`` takes the points with ``index % n == i``; :func:`merge` combines shard files into one
summary.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from certdist.attacks.apgd import apgd
from certdist.attacks.pgd import pgd, search_counterexample
from certdist.bounds import Interval
from certdist.models.cnn import check_float32
from certdist.propagation.ibp import check_fixed_batchnorm, exact_fp32, ibp
from certdist.specs import margin_matrix
from certdist.threats import ThreatModel
from certdist.verification.bab import bab_verify
from certdist.verification.chain_bab import chain_bab_verify
from certdist.verification.dense import DenseNet, TooLargeError, count_unstable, crown_bounds, dense_from_model
from certdist.verification.milp import milp_verify
from certdist.propagation.alpha import alpha_crown
from certdist.propagation.crown import crown
from certdist.verification.rounding import fp32_error_bound, margin_tolerance, proved

STATUSES = ("misclassified", "falsified", "verified", "unknown")
COMPLETE_METHODS = ("auto", "chain-bab", "bab", "milp", "none")
CEX_TOL = 1e-6


@dataclass(frozen=True)
class CertifyConfig:
    """Everything that determines a verdict (saved in every record's ``config`` hash-free form).

    The budget of a point is counted in work (the effort budget), so that one checkpoint gives the same
    verdicts on any machine and under any load: ``quick_attack_steps`` x ``quick_restarts`` PGD steps
    (margin loss, the restarts batched), then IBP and CROWN, then on the points still open ``attack_steps``
    x ``restarts`` PGD steps per loss in ``attack_losses`` and ``apgd_restarts`` x ``attack_steps`` APGD-DLR
    steps, ``alpha_iterations`` alpha-CROWN steps, and for the complete stage at most ``max_domains``
    branch-and-bound domains (all margin rows together) or ``milp_max_nodes`` MILP nodes per row.
    ``timeout`` is the wall-clock cap per point (all stages together; the full attack gets at most
    ``attack_share`` of it): a point that hits it ends ``unknown`` with ``capped`` in its record, and only
    such points' verdicts can depend on the machine's speed; :func:`summarize` counts them.

    ``complete``: ``auto`` (the exact MILP when the network has a dense form and the point has at most
    ``milp_max_unstable`` unstable ReLUs after CROWN, else ``chain-bab``), ``chain-bab`` (branch and bound on
    the layer chain, any network), ``bab`` (branch and bound on the dense form; ``chain-bab`` for networks
    without one), ``milp`` (dense form only) or ``none``. ``bab_*``: branch-and-bound batch size and
    alpha/beta optimisation steps per batch; ``chain_bab_alpha_steps``: those of the chain BaB, whose children
    start from their parent's slopes and multipliers, so that fewer steps suffice. ``max_dense_weights``:
    complete verification needs the network as dense matrices of at most this many entries each.
    ``counterexample_dir``: also save each counterexample as ``<index>.pt`` there.
    ``batched_ibp``: decide misclassified and IBP-verified points for the whole file in batches first
    (``batch_size`` points at a time) and run the per-point pipeline on the rest only; the verdicts are those
    of the per-point order, since a point that IBP proves robust can have no counterexample for the attack to
    find (only the times differ: such a point is charged its share of the batch's time)."""

    timeout: float = 10.0
    complete: str = "auto"
    quick_attack_steps: int = 20
    quick_restarts: int = 2
    attack_steps: int = 100
    restarts: int = 5
    attack_losses: tuple[str, ...] = ("margin", "ce")
    apgd_restarts: int = 5
    attack_share: float = 0.3
    alpha_iterations: int = 20
    alpha_lr: float = 0.1
    milp_max_unstable: int = 64
    milp_max_nodes: int = 5000
    milp_threads: int = 1
    max_domains: int = 2000
    bab_batch: int = 64
    bab_alpha_steps: int = 20
    chain_bab_alpha_steps: int = 10
    max_dense_weights: int = 20_000_000
    seed: int = 0
    counterexample_dir: str | None = None
    batched_ibp: bool = True
    batch_size: int = 256

    # fields that cannot change a verdict (only where files go and how the work is batched)
    NOT_VERDICT_RELEVANT = ("counterexample_dir", "batched_ibp", "batch_size", "milp_threads")

    def verdict_settings(self) -> dict[str, Any]:
        """The fields that can change a verdict, as saved in every record (resume refuses others)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.name not in self.NOT_VERDICT_RELEVANT}

    def __post_init__(self) -> None:
        if self.complete not in COMPLETE_METHODS:
            raise ValueError(f"unknown complete method {self.complete!r}; known: {', '.join(COMPLETE_METHODS)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.attack_steps < 0 or self.restarts < 1 or self.apgd_restarts < 0:
            raise ValueError(f"need attack_steps >= 0, restarts >= 1 and apgd_restarts >= 0, got {self.attack_steps}, "
                             f"{self.restarts}, {self.apgd_restarts}")
        if self.quick_attack_steps < 0 or self.quick_restarts < 1:
            raise ValueError(f"need quick_attack_steps >= 0 and quick_restarts >= 1, got {self.quick_attack_steps}, "
                             f"{self.quick_restarts}")
        if not 0 < self.attack_share <= 1:
            raise ValueError(f"attack_share is the wall-clock share of the full attack, in (0, 1]; got {self.attack_share}")
        if self.max_domains < 1 or self.milp_max_nodes < 1 or self.alpha_iterations < 0:
            raise ValueError(f"need max_domains >= 1, milp_max_nodes >= 1 and alpha_iterations >= 0, got "
                             f"{self.max_domains}, {self.milp_max_nodes}, {self.alpha_iterations}")


# ---------------------------------------------------------------------------------------------------
# The networks a point is verified on.

def eval_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy (BatchNorm with running statistics); the caller's model is untouched.
    Raises ValueError on a BatchNorm without running statistics (not a fixed function in eval mode)."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        check_fixed_batchnorm(m)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@dataclass
class Verifier:
    """What the pipeline runs on: the eval-mode float32 network that verdicts are about (``net``), its
    float64 copy that every bound is computed on (``net64``), and the dense form for complete
    verification (or a string saying why it is unavailable). Build it with :func:`prepare`."""

    net: nn.Module
    net64: nn.Module
    dense: DenseNet | str


def prepare(model: nn.Module, input_shape: tuple[int, ...], cfg: CertifyConfig,
            dense: DenseNet | str | None = None) -> Verifier:
    """Eval-mode copies of ``model`` (float32 and float64) and its dense form (``dense`` if given).
    Raises ValueError on a model that is not float32."""
    from certdist.models.support import check_supported
    check_supported(model, input_shape)  # the layer-support contract, before any stage runs or record is written
    check_float32(model, "certify")
    net = eval_copy(model)
    net64 = copy.deepcopy(net).double()
    return Verifier(net, net64, _dense_or_reason(net, input_shape, cfg) if dense is None else dense)


class _FixedBox:
    """The threat model with its box fixed to the float32 box cast to float64: bounds in float64 must
    cover every float32 point that :func:`validate_counterexample` accepts, and the float32 box
    ``clip(x -/+ eps)`` differs from the float64 one by its rounding."""

    def __init__(self, threat: ThreatModel, box: Interval) -> None:
        self.threat, self.fixed = threat, box

    def box(self, x: torch.Tensor, eps: float | None = None) -> Interval:
        if eps is not None and eps != self.threat.eps:
            raise ValueError(f"the box is fixed at eps={self.threat.eps}, got eps={eps}")
        return self.fixed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.threat, name)


def _box64(threat: ThreatModel, x: torch.Tensor) -> Interval:
    box = threat.box(x)
    return Interval(box.lower.to(torch.float64), box.upper.to(torch.float64))


def tolerance(net64: nn.Module, box64: Interval, C: torch.Tensor,
              relu_bounds: list[Interval | None] | None = None) -> torch.Tensor:
    """Per-row float32 tolerance [B, S] of the margins ``C`` [B, S, K] over the box: a row is proved
    only when its lower bound exceeds it (:func:`certdist.verification.rounding.proved`). It covers
    float32 evaluation at every point :func:`validate_counterexample` accepts (box tolerance ``CEX_TOL``).
    ``relu_bounds``: sound pre-activation bounds over ``box64`` (CROWN's), which tighten the activation
    ranges the error recursion starts from."""
    return margin_tolerance(fp32_error_bound(net64, box64, input_slack=CEX_TOL, relu_bounds=relu_bounds), C)


def ibp_proved(net64: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IBP as the pipeline counts it: ``(lower, tol, ok)``, the margins' IBP lower bounds [B, K-1] in
    float64 (``net64``: the float64 eval-mode copy) over the float32 boxes around ``x``, their float32
    tolerance, and ``ok`` [B]: every row proved (lower > tol; NaN never). Whether the float32 network
    classifies ``x`` correctly is the caller's check."""
    box64 = _box64(threat, x)
    C = margin_matrix(y, num_classes).to(torch.float64)
    lower = ibp(net64, x.to(torch.float64), _FixedBox(threat, box64), C=C).lower
    tol = tolerance(net64, box64, C)
    return lower, tol, proved(lower, tol).all(dim=1)


# ---------------------------------------------------------------------------------------------------
# Counterexamples.

def validate_counterexample(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: int,
                            threat: ThreatModel, tol: float = CEX_TOL) -> bool:
    """True iff ``x_adv`` ([1, ...], like ``x``) is inside the box (tolerance ``tol``), inside the data
    range and misclassified by ``model`` (which must be the eval-mode network)."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        return False
    if not bool(threat.contains(x_adv, x, tol).all()):
        return False
    if x_adv.min() < threat.data_min or x_adv.max() > threat.data_max:
        return False
    with torch.no_grad():
        return int(model(x_adv).argmax(1)) != int(y)


def _candidate_checker(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel):
    """``check(flat float64 point) -> validated counterexample | None`` for BaB and the MILP. The point
    is first rounded to the model's dtype and projected onto the box (solver tolerances)."""
    def check(flat: torch.Tensor) -> torch.Tensor | None:
        cand = threat.project(flat.to(x.dtype).view_as(x), x)
        return cand if validate_counterexample(model, cand, x, y, threat) else None
    return check


# ---------------------------------------------------------------------------------------------------
# One point.

@dataclass
class _Point:
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
def _timed(p: _Point, stage: str) -> Iterator[None]:
    p.stage = stage
    t0 = time.monotonic()
    try:
        yield
    finally:
        p.seconds[stage] = p.seconds.get(stage, 0.0) + time.monotonic() - t0


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _record(p: _Point, status: str, stage: str, cfg: CertifyConfig, eps: float, pred: int | None,
            cex: torch.Tensor | None = None, model: nn.Module | None = None, **extra: Any) -> dict[str, Any]:
    rec = {"index": p.index, "label": p.label, "status": status, "stage": stage,
           "time_s": round(time.monotonic() - p.start, 6), "eps": eps, "pred": pred,
           "margins": {k: _finite(v) if v is not None else None for k, v in p.margins.items()}}
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


def _quick_attack(model, x, y_t, threat, cfg: CertifyConfig, p: _Point) -> torch.Tensor | None:
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


def _full_attack(model, x, y_t, threat, cfg: CertifyConfig, p: _Point) -> tuple[torch.Tensor | None, str]:
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
    if not (cfg.apgd_restarts and cfg.attack_steps and _num_classes(model, x) >= 3):
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


def _ibp_crown(net64, x64, box: "_FixedBox", C, tol, p: _Point
               ) -> tuple[str | None, torch.Tensor, list[Interval] | None, torch.Tensor]:
    """IBP, then CROWN (intermediate bounds "best": CROWN where IBP leaves neurons unstable, intersected
    with IBP), in float64 over ``box`` (the float32 box in float64, as a :class:`_FixedBox`). Returns (proving stage or None, best
    lower bound per row [S], CROWN's pre-activation bounds per ReLU or None, the float32 tolerance per row
    [S]). ``tol`` (from IBP's activation ranges) is tightened with CROWN's: both are sound, so is their
    minimum. A stage proves the point when every row is proved."""
    with _timed(p, "ibp"), torch.no_grad():
        best = _finite_or_minus_inf(ibp(net64, x64, box, C=C).lower[0])
        p.spend("ibp", bound_passes=1)
    p.margins["ibp"] = float(best.min())
    if proved(best, tol).all():
        return "ibp", best, None, tol
    if p.left() <= 0:
        p.cap("ibp")
        return None, best, None, tol
    with _timed(p, "crown"), torch.no_grad():
        out, pre = crown(net64, x64, box, C=C, intermediate="best", bound_upper=False, return_intermediate=True)
        p.spend("crown", bound_passes=1)
        tol = torch.minimum(tol, tolerance(net64, box.fixed, C, relu_bounds=pre)[0])
    low = _finite_or_minus_inf(out.lower[0].detach())
    p.margins["crown"] = float(low.min())
    best = torch.maximum(best, low)
    return ("crown" if proved(best, tol).all() else None), best, pre, tol


def _alpha_stage(net64, x64, box: "_FixedBox", C, best, tol, pre, cfg: CertifyConfig, p: _Point
                 ) -> tuple[bool, torch.Tensor]:
    """alpha-CROWN (``alpha_iterations`` steps) from CROWN's intermediate bounds; (proved, best lower bound)."""
    if cfg.alpha_iterations == 0:
        return False, best
    if p.left() <= 0:
        p.cap("alpha-crown")
        return False, best
    with _timed(p, "alpha-crown"), torch.no_grad():
        out = alpha_crown(net64, x64, box, C=C, iterations=cfg.alpha_iterations, lr=cfg.alpha_lr,
                          intermediate="crown", intermediate_bounds=pre, bound_upper=False)
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


def _complete(model, dense: DenseNet, x, y: int, threat, C_rows, tol_rows, cfg: CertifyConfig, p: _Point,
              method: str):
    """Dense BaB or MILP on the rows not yet proved (``method="auto"``: the MILP if few ReLUs are unstable,
    else None); returns (status, stage, counterexample, extra) or None."""
    box = _box64(threat, x)
    lo, hi = box.lower.view(1, -1), box.upper.view(1, -1)
    lbs, ubs = crown_bounds(dense, lo, hi)
    lbs, ubs = [l[0] for l in lbs], [u[0] for u in ubs]
    unstable = count_unstable(lbs, ubs)
    if method == "auto":
        if unstable > cfg.milp_max_unstable:
            return None
        method = "milp"
    check = _candidate_checker(model, x, y, threat)
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


def _chain_complete(model, x, y: int, threat, box64: Interval, C_rows, tol_rows, cfg: CertifyConfig, p: _Point,
                    pre: list[Interval] | None):
    """Branch and bound on the layer chain (``chain_bab``) over the float32 box ``box64``, from the CROWN
    stage's intermediate bounds ``pre`` when it ran; a domain closes only above the largest float32
    tolerance of the open rows (the soundness policy). Returns (status, stage, counterexample, extra)."""
    threshold = float(tol_rows.max()) if tol_rows.numel() else 0.0
    with _timed(p, "chain-bab"):
        res = chain_bab_verify(model, x, _FixedBox(threat, box64), C_rows, max(p.left(), 1e-3),
                               _candidate_checker(model, x, y, threat), threshold=threshold, batch=cfg.bab_batch,
                               alpha_steps=cfg.chain_bab_alpha_steps, root_bounds=pre, max_domains=cfg.max_domains)
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


def certify_point(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel, cfg: CertifyConfig,
                  index: int = 0, dense: DenseNet | str | None = None) -> dict[str, Any]:
    """Run the pipeline on one point ``x`` [1, C, H, W] of ``model`` (any mode: an eval-mode copy is
    verified, with TF32 off). ``dense``: the network's dense form for complete verification, or a
    string saying why it is unavailable; by default it is built from the model (``cfg.max_dense_weights``).
    To certify many points, build the networks once with :func:`prepare` and call :func:`certify_prepared`."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one point x of shape [1, C, H, W], got {tuple(x.shape)}")
    _check_inputs(x, torch.tensor([int(y)]), threat)
    with exact_fp32():
        return certify_prepared(prepare(model, tuple(x.shape[1:]), cfg, dense), x, y, threat, cfg, index)


def certify_prepared(v: Verifier, x: torch.Tensor, y: int, threat: ThreatModel, cfg: CertifyConfig,
                     index: int = 0) -> dict[str, Any]:
    """:func:`certify_point` on networks built by :func:`prepare` (call inside :func:`exact_fp32`).

    The schedule never lets an attack starve the bounds: clean prediction, the quick attack, IBP and
    CROWN, the full attack (PGD, then APGD) on what is still open, alpha-CROWN, then the complete stage;
    each stage has its own effort budget (:class:`CertifyConfig`), and the wall-clock ``timeout`` is a cap."""
    model = v.net
    start = time.monotonic()
    p = _Point(index, int(y), start, start + cfg.timeout, {})
    y_t = torch.tensor([int(y)], device=x.device)
    with torch.no_grad():
        pred = int(model(x).argmax(1))
    if pred != int(y):
        return _record(p, "misclassified", "clean", cfg, threat.eps, pred)
    cex = _quick_attack(model, x, y_t, threat, cfg, p)
    if cex is not None:
        return _record(p, "falsified", "attack-quick", cfg, threat.eps, pred, cex, model)
    box64 = _box64(threat, x)
    box, x64 = _FixedBox(threat, box64), x.to(torch.float64)
    C = margin_matrix(y_t, _num_classes(model, x)).to(torch.float64)
    tol = tolerance(v.net64, box64, C)[0]
    proved_by, best, pre, tol = _ibp_crown(v.net64, x64, box, C, tol, p)
    fp = lambda: {"fp32_tol": _finite(float(tol.max()))}  # noqa: E731 - the tolerance as it stands
    if proved_by is not None:
        return _record(p, "verified", proved_by, cfg, threat.eps, pred, **fp())
    if p.left() > 0:
        cex, stage = _full_attack(model, x, y_t, threat, cfg, p)
        if cex is not None:
            return _record(p, "falsified", stage, cfg, threat.eps, pred, cex, model, **fp())
    done, best = _alpha_stage(v.net64, x64, box, C, best, tol, pre, cfg, p)
    if done:
        return _record(p, "verified", "alpha-crown", cfg, threat.eps, pred, **fp())
    unstable = None if pre is None else count_unstable([b.lower for b in pre], [b.upper for b in pre])
    method, why = _complete_method(cfg, v.dense, unstable)
    if method is None:
        p.message = (p.message + "; " if p.message else "") + why
        return _record(p, "unknown", p.stage, cfg, threat.eps, pred, **fp())
    if p.left() <= 0:
        p.cap(p.stage)
        return _record(p, "unknown", p.stage, cfg, threat.eps, pred, **fp())
    open_rows = ~proved(best, tol)  # NaN-safe: a row is dropped only when it is proved
    rows = (C[0][open_rows], tol[open_rows])
    done = None
    if method != "chain-bab":
        done = _complete(model, v.dense, x, int(y), threat, *rows, cfg, p, method)
    if done is None:  # chain-bab, or "auto" with too many unstable ReLUs for the MILP
        done = _chain_complete(model, x, int(y), threat, box64, *rows, cfg, p, pre)
    status, stage, cex, extra = done
    return _record(p, status, stage, cfg, threat.eps, pred, cex, model, **fp(), **extra)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    with torch.no_grad():
        return int(model(x).shape[1])


# ---------------------------------------------------------------------------------------------------
# Files: reading, resuming, merging, summaries.

def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines result file (a truncated last line, from a killed run, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:  # the partial last line of a killed run
                break
            raise ValueError(f"{path}: line {n + 1} is not valid JSON") from None
    return out


def _drop_partial_line(path: Path) -> None:
    """Cut a trailing line without newline (a record being written when the run was killed)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts per status and per (status, stage), accuracies and times over ``records``; per stage, the
    effort spent (attack steps, bound passes, domains, ...) and seconds, summed over the points; and
    ``capped``: the points that reached the wall-clock cap (the only verdicts that can depend on the
    machine's speed or load)."""
    records = list(records)
    n = len(records)
    counts = {s: 0 for s in STATUSES}
    stages: dict[str, dict[str, int]] = {s: {} for s in STATUSES}
    effort: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    capped = 0
    for r in records:
        counts[r["status"]] += 1
        stages[r["status"]][r["stage"]] = stages[r["status"]].get(r["stage"], 0) + 1
        for stage, work in r.get("effort", {}).items():
            mine = effort.setdefault(stage, {})
            for k, v in work.items():
                mine[k] = mine.get(k, 0) + v
        for stage, t in r.get("stage_time_s", {}).items():
            seconds[stage] = seconds.get(stage, 0.0) + t
        capped += bool(r.get("capped"))
    times = [r["time_s"] for r in records]
    frac = (lambda k: k / n) if n else (lambda k: float("nan"))
    eps = sorted({r.get("eps") for r in records}, key=str)
    return {
        "n": n, "eps": eps[0] if len(eps) == 1 else eps, "counts": counts, "stages": stages,
        "effort": effort, "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}, "capped": capped,
        "clean_accuracy": frac(n - counts["misclassified"]),
        "attack_accuracy": frac(n - counts["misclassified"] - counts["falsified"]),
        "certified_accuracy": frac(counts["verified"]),
        "ibp_certified_accuracy": frac(stages["verified"].get("ibp", 0)),
        "time_median_s": statistics.median(times) if times else float("nan"),
        "time_max_s": max(times) if times else float("nan"),
    }


STAGE_ORDER = ("clean", "attack-quick", "ibp", "crown", "attack", "apgd", "alpha-crown", "milp", "bab", "chain-bab")


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result: verdicts per status and stage, then per stage the
    points that ended there unknown, the work and the seconds spent."""
    lines = [f"points: {summary['n']}   eps: {summary['eps']}", "", f"{'status':<14}{'stage':<13}{'count':>7}"]
    for status in STATUSES:
        lines.append(f"{status:<14}{'(all)':<13}{summary['counts'][status]:>7}")
        for stage, k in sorted(summary["stages"][status].items()):
            lines.append(f"{'':<14}{stage:<13}{k:>7}")
    effort, secs = summary.get("effort", {}), summary.get("stage_seconds", {})
    if effort or secs:
        order = [s for s in STAGE_ORDER if s in effort or s in secs] + sorted((set(effort) | set(secs)) - set(STAGE_ORDER))
        lines += ["", f"{'stage':<13}{'unknown':>8}{'seconds':>10}  work"]
        for stage in order:
            work = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(effort.get(stage, {}).items()))
            lines.append(f"{stage:<13}{summary['stages']['unknown'].get(stage, 0):>8}{secs.get(stage, 0.0):>10.1f}  {work}")
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    lines += ["", f"clean accuracy            {pct(summary['clean_accuracy'])}",
              f"attack accuracy           {pct(summary['attack_accuracy'])}",
              f"certified (IBP only)      {pct(summary['ibp_certified_accuracy'])}",
              f"certified (pipeline)      {pct(summary['certified_accuracy'])}",
              f"time per point: median {summary['time_median_s']:.3f} s, max {summary['time_max_s']:.3f} s"]
    if summary.get("capped"):
        lines.append(f"wall-clock cap reached on {summary['capped']} point(s): their verdicts can depend on the "
                     "machine's speed and load (raise --timeout, or lower the effort budget)")
    return "\n".join(lines)


def merge(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Summary of several shard files; ValueError on a point present twice, on differing eps or on
    records of different models, data or settings."""
    seen: dict[int, str] = {}
    records = []
    for path in paths:
        for r in read_records(path):
            if r["index"] in seen:
                raise ValueError(f"point {r['index']} appears twice: in {seen[r['index']]} and in {path}")
            seen[r["index"]] = str(path)
            records.append(r)
    eps = {r.get("eps") for r in records}
    if len(eps) > 1:
        raise ValueError(f"cannot merge results for different eps: {sorted(eps, key=str)}")
    for key in FINGERPRINT_KEYS:
        if len({json.dumps(r.get(key), sort_keys=True) for r in records}) > 1:
            raise ValueError(f"cannot merge results of different runs: the records differ in {key!r}")
    return summarize(sorted(records, key=lambda r: r["index"]))


# ---------------------------------------------------------------------------------------------------
# Fingerprints: which model, data and settings a record's verdict is about.

# Bump on every change of the bound code or of the stages' policy that can change a verdict (a rule, a
# tolerance, a stage added or reordered): resuming a file of another version then refuses instead of
# mixing old and new verdicts. 2026.11.2: APGD stage, chain-BaB warm starts (stop 15); .3: versioned;
# .4: float32 tolerance from CROWN's activation ranges once the CROWN stage ran; .5: the CROWN stage's
# intermediate bounds are "best" (CROWN where IBP leaves neurons unstable, intersected with IBP).
# 2026.12.1: the effort-budget schedule (quick attack, IBP + CROWN, full attack, alpha-CROWN, complete
# stage with a domain / node budget). .2: CROWN sums nn.Linear's bias over the positions of a non-flat
# input; dense BaB never drops a domain as empty on bounds crossed by rounding.
VERIFIER_VERSION = "2026.12.2"
FINGERPRINT_KEYS = ("model_hash", "data_hash", "settings", "verifier")


def _hash_tensors(h, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())


def model_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the architecture (``repr``) and every parameter and buffer."""
    h = hashlib.sha256(repr(model).encode())
    _hash_tensors(h, model.state_dict().items())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel,
                cfg: CertifyConfig) -> dict[str, Any]:
    """What every record carries so that a resume never mixes verdicts of different runs."""
    h = hashlib.sha256()
    _hash_tensors(h, [("images", images), ("labels", labels)])
    settings = {"norm": threat.norm, "data_min": threat.data_min, "data_max": threat.data_max,
                **cfg.verdict_settings()}
    return {"model_hash": model_hash(model), "data_hash": h.hexdigest()[:16], "settings": settings,
            "verifier": VERIFIER_VERSION}


def _resume(out: Path, threat: ThreatModel, fp: dict[str, Any]) -> set[int]:
    _drop_partial_line(out)
    done = read_records(out)
    other = {r.get("eps") for r in done} - {threat.eps}
    if other:
        raise ValueError(f"{out} holds results for eps {sorted(other, key=str)}, not {threat.eps}; "
                         "use another output file")
    fix = "certify into another output file (--out) or delete this one"
    for r in done:
        missing = [k for k in FINGERPRINT_KEYS if k not in r]
        if missing:
            raise ValueError(f"{out}: point {r['index']} has no {'/'.join(missing)} fingerprint (written by an "
                             f"older certdist), so its verdict cannot be matched to this run; {fix}")
        if r["verifier"] != fp["verifier"]:
            raise ValueError(f"{out} holds verdicts of verifier version {r['verifier']}, this is "
                             f"{fp['verifier']} (the bounds or stages changed since); {fix}")
        if r["model_hash"] != fp["model_hash"]:
            raise ValueError(f"{out} holds verdicts of another model (state hash {r['model_hash']}, this model: "
                             f"{fp['model_hash']}), e.g. of an earlier or retrained checkpoint; {fix}")
        if r["data_hash"] != fp["data_hash"]:
            raise ValueError(f"{out} holds verdicts on other data (hash {r['data_hash']}, these images: "
                             f"{fp['data_hash']}); {fix}")
        if r["settings"] != fp["settings"]:
            diff = sorted(set(r["settings"]) | set(fp["settings"]))
            diff = [f"{k}: {r['settings'].get(k)!r} there, {fp['settings'].get(k)!r} now" for k in diff
                    if r["settings"].get(k) != fp["settings"].get(k)]
            raise ValueError(f"{out} holds verdicts made with other settings ({'; '.join(diff)}); {fix}")
    return {r["index"] for r in done}


# ---------------------------------------------------------------------------------------------------
# The dataset entry point.

def _check_inputs(images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel) -> None:
    if images.dtype != torch.float32:
        raise ValueError(f"images must be float32 in [{threat.data_min}, {threat.data_max}], got "
                         f"{images.dtype} (convert them with .float(); uint8 images with .float() / 255)")
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isfinite(images).all() or images.min() < threat.data_min or images.max() > threat.data_max:
        raise ValueError(f"images must be finite and inside [{threat.data_min}, {threat.data_max}]")


def _dense_or_reason(model: nn.Module, input_shape: tuple[int, ...], cfg: CertifyConfig) -> DenseNet | str:
    if cfg.complete == "none":
        return "complete verification disabled"
    try:
        return dense_from_model(model, input_shape, cfg.max_dense_weights)
    except (TooLargeError, TypeError) as e:
        return f"complete verification unavailable: {e}"


def certify_dataset(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel,
                    out_path: str | os.PathLike, timeout: float | None = None, limit: int | None = None,
                    shard: tuple[int, int] = (0, 1), complete: str | None = None, attack_steps: int | None = None,
                    restarts: int | None = None, progress: bool | None = None, config: CertifyConfig | None = None,
                    **options: Any) -> dict[str, Any]:
    """Certify the first ``limit`` points (all by default) of ``images`` [N, C, H, W] (floats in the
    threat's data range) with ``labels`` [N], appending one JSON line per point to ``out_path``.

    Points already in ``out_path`` are skipped (resume) when the file's records are of the same model
    state, data and verdict-relevant settings (:func:`fingerprint`, saved in every record); otherwise
    ValueError. ``shard=(i, n)`` processes the indices with ``index % n == i``. ``timeout``: seconds per
    point (the wall-clock cap; the effort budget is in :class:`CertifyConfig`). ``complete``: ``auto`` |
    ``chain-bab`` | ``bab`` | ``milp`` | ``none``. Other :class:`CertifyConfig` fields can be given as keyword
    ``options`` or as a whole ``config``; the arguments given explicitly (not None) override its fields,
    the others keep the config's values. ``progress``: a progress bar (default None: when stderr is a
    terminal). Returns :func:`summarize` of the records of
    the points asked for (this shard's among the first ``limit``; none for ``limit=0``); print it with
    :func:`format_summary`."""
    i_shard, n_shard = shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    unknown = set(options) - {f.name for f in fields(CertifyConfig)}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; CertifyConfig fields: "
                        f"{', '.join(f.name for f in fields(CertifyConfig))}")
    given = {"timeout": None if timeout is None else float(timeout), "complete": complete,
             "attack_steps": attack_steps, "restarts": restarts}
    cfg = replace(config or CertifyConfig(), **{k: v for k, v in given.items() if v is not None}, **options)
    _check_inputs(images, labels, threat)
    n = images.shape[0] if limit is None else max(0, min(int(limit), images.shape[0]))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    verifier = prepare(model, tuple(images.shape[1:]), cfg, "not needed")  # refuses non-fixed networks early
    fp = fingerprint(verifier.net, images, labels, threat, cfg)
    done = _resume(out, threat, fp)
    mine = [i for i in range(n) if i % n_shard == i_shard]
    todo = [i for i in mine if i not in done]
    if todo:
        verifier.dense = _dense_or_reason(verifier.net, tuple(images.shape[1:]), cfg)
    with exact_fp32():
        _run(verifier, images, labels, threat, cfg, out, todo, fp, progress)
    mine_set = set(mine)  # the summary is of the points asked for (none for limit=0), not of the whole file
    return summarize(r for r in read_records(out) if r["index"] in mine_set)


def _batched_ibp(v: Verifier, images, labels, threat, cfg: CertifyConfig, todo: list[int]) -> dict[int, dict[str, Any]]:
    """Records of the points decided by the clean prediction or by IBP, computed in batches, with the
    per-point rules: the clean prediction of a single-point forward pass (a batch may round
    differently), IBP in float64 on the float32 boxes and the float32 tolerance."""
    decided: dict[int, dict[str, Any]] = {}
    for s in range(0, len(todo), cfg.batch_size):
        idx = todo[s:s + cfg.batch_size]
        start = time.monotonic()
        x = images[idx]
        y = labels[idx].to(x.device).long()
        with torch.no_grad():
            pred = v.net(x).argmax(1)
            for k in torch.nonzero(pred != y).flatten().tolist():  # few: decide them as certify_prepared does
                pred[k] = v.net(x[k:k + 1]).argmax(1)[0]
            lower, tol, ok = ibp_proved(v.net64, x, y, threat, _num_classes(v.net, x[:1]))
        share = (time.monotonic() - start) / len(idx)
        for k, i in enumerate(idx):
            p = _Point(i, int(y[k]), time.monotonic() - share, 0.0, {})
            if int(pred[k]) != int(y[k]):
                decided[i] = _record(p, "misclassified", "clean", cfg, threat.eps, int(pred[k]))
            elif ok[k]:
                p.margins["ibp"] = float(lower[k].min())
                decided[i] = _record(p, "verified", "ibp", cfg, threat.eps, int(pred[k]),
                                     fp32_tol=_finite(float(tol[k].max())))
    return decided


def _run(v: Verifier, images, labels, threat, cfg: CertifyConfig, out: Path, todo: list[int],
         fp: dict[str, Any], progress: bool | None) -> None:
    from tqdm.auto import tqdm
    # the first torch.optim optimiser imports torch._dynamo (seconds): not to be charged to point 0
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    counts = {s: 0 for s in STATUSES}
    decided = _batched_ibp(v, images, labels, threat, cfg, todo) if cfg.batched_ibp else {}
    with open(out, "a") as f, tqdm(todo, desc="certify", disable=None if progress is None else not progress, unit="pt") as bar:
        for i in bar:
            rec = decided.get(i) or certify_prepared(v, images[i:i + 1], int(labels[i]), threat, cfg, i)
            rec.update(fp)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            counts[rec["status"]] += 1
            bar.set_postfix({k[:5]: c for k, c in counts.items()}, refresh=False)


__all__ = ["VERIFIER_VERSION", "CertifyConfig", "Verifier", "certify_dataset", "certify_point", "certify_prepared",
           "eval_copy", "fingerprint", "format_summary", "merge", "model_hash", "prepare", "read_records", "summarize",
           "validate_counterexample", "STATUSES", "COMPLETE_METHODS"]
