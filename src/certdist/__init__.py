"""certdist: certified training with distillation from empirically-robust teachers.

The public API (docs/api.md), importable from ``certdist`` directly:

- training: :func:`fit` (the loop of ``certdist train`` on one's own model and DataLoader);
- evaluation: :func:`evaluate` (clean / PGD, APGD or AutoAttack / IBP-certified accuracy), :func:`certify`
  (the full verification pipeline), :func:`certify_dataset` (on tensors, JSON lines out);
- bounds: :func:`ibp`, :func:`crown` (full CROWN), :func:`crown_ibp`, :func:`alpha_crown`;
- export: :func:`export_onnx`, :func:`export_benchmark` (ONNX + VNN-LIB);
- ONNX / VNN-LIB in: :func:`load_onnx` (an ONNX file as an ``nn.Sequential``), :func:`verify_vnnlib` (one
  ONNX + VNN-LIB instance: sat / unsat / timeout / unknown), :func:`verify_instances` (a benchmark folder);
- :class:`ThreatModel`, :func:`as_certifiable`, :class:`Normalize`.

Every entry point accepts an ``nn.Sequential`` ending in an ``nn.Linear``. The names are imported on
first use, so ``import certdist`` (and the command line) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from certdist.threats import ThreatModel  # noqa: E402
from certdist.bounds import Interval, LinearBounds  # noqa: E402

_LAZY = {
    "fit": "certdist.api", "evaluate": "certdist.api", "certify": "certdist.api", "FitResult": "certdist.api",
    "ibp": "certdist.propagation", "crown": "certdist.propagation", "crown_ibp": "certdist.propagation",
    "alpha_crown": "certdist.propagation",
    "certify_dataset": "certdist.verification", "format_summary": "certdist.verification",
    "export_onnx": "certdist.interop", "export_benchmark": "certdist.interop",
    "as_certifiable": "certdist.models", "Normalize": "certdist.models", "build_model": "certdist.models",
    "tune": "certdist.tune",  # hyper-parameter search on the validation split (needs optuna)
    "load_onnx": "certdist.interop", "verify_vnnlib": "certdist.verification.vnnlib_verify",
    "verify_instances": "certdist.verification.vnnlib_verify",
}

__all__ = ["ThreatModel", "Interval", "LinearBounds", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # submodules: certdist.evaluation, certdist.verification, ...
        return importlib.import_module(f"certdist.{name}")
    except ModuleNotFoundError:
        pass
    raise AttributeError(f"module 'certdist' has no attribute {name!r}")
