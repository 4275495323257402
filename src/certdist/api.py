"""The library entry points on one's own network and DataLoaders: :func:`fit`, :func:`evaluate`,
:func:`certify` (the bound functions and the exporters are re-exported by :mod:`certdist`).

Every function accepts a :class:`~certdist.models.CertifiableNet` or a plain ``nn.Sequential`` whose
last layer is an ``nn.Linear`` (inputs in [0, 1], normalisation inside the model), and runs the same
code as the command line (``certdist train`` / ``evaluate`` / ``certify``).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from certdist.evaluation import check_device
from certdist.evaluation import evaluate as _evaluate
from certdist.specs import check_labels
from certdist.threats import ThreatModel
from certdist.training.fit import FitResult, fit, loader_tensors

__all__ = ["FitResult", "certify", "evaluate", "fit", "loader_tensors"]


def _threat(eps: float | str | ThreatModel) -> ThreatModel:
    return eps if isinstance(eps, ThreatModel) else ThreatModel(eps)


def _checked_labels(data: Any, where: str) -> Any:
    """``data`` for :func:`loader_tensors`, each batch's labels checked first to be integer class
    indices [B] (:func:`certdist.specs.check_labels`): its ``.long()`` would truncate float labels and
    keep one-hot ones."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        check_labels(data[1], where=f"{where}: labels")
        return data

    def batches():
        for batch in data:
            if isinstance(batch, (tuple, list)) and len(batch) >= 2:
                y = batch[1]
                check_labels(y if isinstance(y, torch.Tensor) else torch.as_tensor(y), where=f"{where}: labels")
            yield batch
    return batches()


def evaluate(model: nn.Module, loader: Iterable, eps: float | str | ThreatModel, attack: str = "pgd",
             limit: int | None = None, steps: int = 40, restarts: int = 1, step_size: float = 0.035,
             batch_size: int = 500, device: str = "cpu", progress: bool | None = False) -> dict:
    """Clean, attacked and IBP-certified accuracy (%) of the eval-mode ``model`` on ``loader`` (a
    DataLoader of ``(images, labels)``, or a pair of tensors), at ``eps`` (a number, ``"8/255"`` or a
    :class:`ThreatModel`). ``attack``: ``"pgd"``, ``"apgd"`` or ``"autoattack"`` (standard AutoAttack, needs
    ``torchattacks``); ``steps``/``restarts``/``step_size``: PGD / APGD settings. ``limit``: the first N points.
    Labels must be integer class indices [N] in ``[0, num_classes)`` (ValueError otherwise; one-hot labels:
    pass ``y.argmax(1)``). ``device``: ``"cpu"`` or ``"cuda"`` (ValueError when CUDA is not available; the
    model is evaluated as a copy on that device). ``progress``: a progress bar (None: only when stderr is a
    terminal)."""
    check_device(device)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all points), got {limit}")
    images, labels = loader_tensors(_checked_labels(loader, "evaluate"), limit)
    return _evaluate(model, images, labels, _threat(eps), steps, restarts, step_size, batch_size, device,
                     progress=progress, attack_name=attack)


def certify(model: nn.Module, loader: Iterable, eps: float | str | ThreatModel, out: str | os.PathLike | None = None,
            timeout: float = 10.0, limit: int | None = None, complete: str = "auto", progress: bool | None = False,
            device: str = "cpu", **options: Any) -> dict:
    """The staged verification pipeline (attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP) on every
    point of ``loader``; returns :func:`certdist.verification.summarize` of the verdicts (print it with
    :func:`certdist.verification.format_summary`). ``out``: the JSON-lines file of per-point records
    (resumed if it exists); without it the records are returned under ``"records"``. ``options``: other
    :class:`certdist.verification.CertifyConfig` fields (``attack_steps``, ``restarts``, ...). Labels must
    be integer class indices [N] in ``[0, num_classes)`` (ValueError otherwise). ``progress``: a progress
    bar (None: only when stderr is a terminal). ``device``: ``"cpu"`` only for now: the verification
    (float64 bounds, then the MILP / branch-and-bound stages, which hand CPU tensors to NumPy and HiGHS)
    runs on the CPU; ``"cuda"`` is refused with a ValueError, as is a CUDA device this machine lacks."""
    from certdist.evaluation import CERTIFY_CPU_ONLY
    from certdist.models import as_certifiable
    from certdist.verification.certify import certify_dataset, read_records
    check_device(device, "certify", supported=("cpu",), reason=CERTIFY_CPU_ONLY)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all points), got {limit}")
    num_classes = as_certifiable(model).num_classes
    if progress is None:
        progress = sys.stderr.isatty()  # as tqdm's disable=None
    if out is not None:  # the whole loader, as the command line: the file's data hash then does not depend on limit
        images, labels = loader_tensors(_checked_labels(loader, "certify"))
        check_labels(labels, num_classes, where="certify: labels")
        return certify_dataset(model, images, labels, _threat(eps), out, timeout=timeout, limit=limit,
                               complete=complete, progress=progress, **options)
    images, labels = loader_tensors(_checked_labels(loader, "certify"), limit)
    check_labels(labels, num_classes, where="certify: labels")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "certify.jsonl"
        summary = certify_dataset(model, images, labels, _threat(eps), path, timeout=timeout, complete=complete,
                                  progress=progress, **options)
        summary["records"] = read_records(path)
    return summary
