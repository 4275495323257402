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

Where each part lives (this module is the dataset loop and re-exports the public names):
:mod:`~certdist.verification.settings` (:class:`CertifyConfig`, the complete verifiers),
:mod:`~certdist.verification.soundness` (the acceptance rule: tolerance, :func:`ibp_proved`,
:func:`validate_counterexample`), :mod:`~certdist.verification.stages` (the stages as one list and
:func:`certify_prepared`), :mod:`~certdist.verification.records` (records, fingerprints, resume, summaries).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certdist.propagation.ibp import exact_fp32
from certdist.threats import ThreatModel
from certdist.verification.dense import DenseNet
from certdist.verification.records import (FINGERPRINT_KEYS, STAGE_ORDER, VERIFIER_VERSION, fingerprint, format_summary,
                                           merge, model_hash, read_records, resumed_indices, summarize)
from certdist.verification.settings import COMPLETE_METHODS, STATUSES, CertifyConfig
from certdist.verification.soundness import CEX_TOL, eval_copy, ibp_proved, tolerance, validate_counterexample
from certdist.verification.stages import (STAGES, Point, Verifier, certify_prepared, dense_or_reason, finite_or_none,
                                          num_classes_of, point_record, prepare_verifier)


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel) -> None:
    if images.dtype != torch.float32:
        raise ValueError(f"images must be float32 in [{threat.data_min}, {threat.data_max}], got "
                         f"{images.dtype} (convert them with .float(); uint8 images with .float() / 255)")
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isfinite(images).all() or images.min() < threat.data_min or images.max() > threat.data_max:
        raise ValueError(f"images must be finite and inside [{threat.data_min}, {threat.data_max}]")


def certify_point(model: nn.Module, x: torch.Tensor, y: int, threat: ThreatModel, cfg: CertifyConfig,
                  index: int = 0, dense: DenseNet | str | None = None) -> dict[str, Any]:
    """Run the pipeline on one point ``x`` [1, C, H, W] of ``model`` (any mode: an eval-mode copy is
    verified, with TF32 off). ``dense``: the network's dense form for complete verification, or a
    string saying why it is unavailable; by default it is built from the model (``cfg.max_dense_weights``).
    To certify many points, build the networks once with :func:`prepare_verifier` and call :func:`certify_prepared`."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one point x of shape [1, C, H, W], got {tuple(x.shape)}")
    _check_inputs(x, torch.tensor([int(y)]), threat)
    with exact_fp32():
        return certify_prepared(prepare_verifier(model, tuple(x.shape[1:]), cfg, dense), x, y, threat, cfg, index)


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
    verifier = prepare_verifier(model, tuple(images.shape[1:]), cfg, "not needed")  # refuses non-fixed networks early
    fp = fingerprint(verifier.net, images, labels, threat, cfg)
    done = resumed_indices(out, threat, fp)
    mine = [i for i in range(n) if i % n_shard == i_shard]
    todo = [i for i in mine if i not in done]
    if todo:
        verifier.dense = dense_or_reason(verifier.net, tuple(images.shape[1:]), cfg)
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
            lower, tol, ok = ibp_proved(v.net64, x, y, threat, num_classes_of(v.net, x[:1]))
        share = (time.monotonic() - start) / len(idx)
        for k, i in enumerate(idx):
            p = Point(i, int(y[k]), time.monotonic() - share, 0.0, {})
            if int(pred[k]) != int(y[k]):
                decided[i] = point_record(p, "misclassified", "clean", cfg, threat.eps, int(pred[k]))
            elif ok[k]:
                p.margins["ibp"] = float(lower[k].min())
                decided[i] = point_record(p, "verified", "ibp", cfg, threat.eps, int(pred[k]),
                                          fp32_tol=finite_or_none(float(tol[k].max())))
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


__all__ = ["CEX_TOL", "COMPLETE_METHODS", "FINGERPRINT_KEYS", "STAGES", "STAGE_ORDER", "STATUSES", "VERIFIER_VERSION",
           "CertifyConfig", "Verifier", "certify_dataset", "certify_point", "certify_prepared", "eval_copy",
           "fingerprint", "format_summary", "ibp_proved", "merge", "model_hash", "prepare_verifier", "read_records",
           "summarize", "tolerance", "validate_counterexample"]
