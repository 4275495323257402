"""The library entry points on one's own network and DataLoaders: :func:`fit`, :func:`evaluate`,
:func:`certify` (the bound functions and the exporters are re-exported by :mod:`certdist`).

Every function accepts a :class:`~certdist.models.CertifiableNet` or a plain ``nn.Sequential`` whose
last layer is an ``nn.Linear`` (inputs in [0, 1], normalisation inside the model), and runs the same
code as the command line (``certdist train`` / ``evaluate`` / ``certify``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from certdist.evaluation import evaluate as _evaluate
from certdist.threats import ThreatModel
from certdist.training.fit import FitResult, fit, loader_tensors

__all__ = ["FitResult", "certify", "evaluate", "fit", "loader_tensors"]


def _threat(eps: float | str | ThreatModel) -> ThreatModel:
    return eps if isinstance(eps, ThreatModel) else ThreatModel(eps)


def evaluate(model: nn.Module, loader: Iterable, eps: float | str | ThreatModel, attack: str = "pgd",
             limit: int | None = None, steps: int = 40, restarts: int = 1, step_size: float = 0.035,
             batch_size: int = 500, device: str = "cpu", progress: bool = False) -> dict:
    """Clean, attacked and IBP-certified accuracy (%) of the eval-mode ``model`` on ``loader`` (a
    DataLoader of ``(images, labels)``, or a pair of tensors), at ``eps`` (a number, ``"8/255"`` or a
    :class:`ThreatModel`). ``attack``: ``"pgd"``, ``"apgd"`` or ``"autoattack"`` (standard AutoAttack, needs
    ``torchattacks``); ``steps``/``restarts``/``step_size``: PGD / APGD settings. ``limit``: the first N points."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all points), got {limit}")
    images, labels = loader_tensors(loader, limit)
    return _evaluate(model, images, labels, _threat(eps), steps, restarts, step_size, batch_size, device,
                     progress=progress, attack_name=attack)


def certify(model: nn.Module, loader: Iterable, eps: float | str | ThreatModel, out: str | os.PathLike | None = None,
            timeout: float = 10.0, limit: int | None = None, complete: str = "auto", progress: bool = False,
            **options: Any) -> dict:
    """The staged verification pipeline (attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP) on every
    point of ``loader``; returns :func:`certdist.verification.summarize` of the verdicts (print it with
    :func:`certdist.verification.format_summary`). ``out``: the JSON-lines file of per-point records
    (resumed if it exists); without it the records are returned under ``"records"``. ``options``: other
    :class:`certdist.verification.CertifyConfig` fields (``attack_steps``, ``restarts``, ...)."""
    from certdist.verification.certify import certify_dataset, read_records
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all points), got {limit}")
    if out is not None:  # the whole loader, as the command line: the file's data hash then does not depend on limit
        images, labels = loader_tensors(loader)
        return certify_dataset(model, images, labels, _threat(eps), out, timeout=timeout, limit=limit,
                               complete=complete, progress=progress, **options)
    images, labels = loader_tensors(loader, limit)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "certify.jsonl"
        summary = certify_dataset(model, images, labels, _threat(eps), path, timeout=timeout, complete=complete,
                                  progress=progress, **options)
        summary["records"] = read_records(path)
    return summary
