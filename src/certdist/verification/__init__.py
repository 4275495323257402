"""Verification: the staged certification pipeline, complete verifiers (BaB, MILP), VNN-LIB instances.

Main entry points:

- :func:`certify_dataset` (``certify.py``): attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP per point,
  JSON lines out, resumable and shardable; :func:`merge` and :func:`format_summary` for the results. The
  pipeline's parts: ``settings.py`` (:class:`CertifyConfig`, the complete verifiers), ``soundness.py`` (the
  one acceptance rule), ``stages.py`` (the stages as a list), ``records.py`` (result files);
- :func:`bab_verify` / :func:`milp_verify`: complete verification of one box on the dense network;
- :func:`~certdist.verification.vnnlib_verify.verify_vnnlib`: one ONNX network + VNN-LIB property.

ONNX and VNN-LIB reading and writing (``export_onnx``, ``export_benchmark``, ...) live in :mod:`certdist.interop`.

The names are imported on first use, so that importing one module of this package (e.g. the soundness
rule, for :mod:`certdist.evaluation`) does not load the complete verifiers.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BabResult": "certdist.verification.bab", "bab_verify": "certdist.verification.bab",
    "COMPLETE_METHODS": "certdist.verification.settings", "STATUSES": "certdist.verification.settings",
    "CertifyConfig": "certdist.verification.settings",
    "certify_dataset": "certdist.verification.certify", "certify_point": "certdist.verification.certify",
    "eval_copy": "certdist.verification.soundness", "validate_counterexample": "certdist.verification.soundness",
    "format_summary": "certdist.verification.records", "merge": "certdist.verification.records",
    "read_records": "certdist.verification.records", "summarize": "certdist.verification.records",
    "DenseNet": "certdist.verification.dense", "TooLargeError": "certdist.verification.dense",
    "dense_from_model": "certdist.verification.dense",
    "MilpResult": "certdist.verification.milp", "milp_verify": "certdist.verification.milp",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
