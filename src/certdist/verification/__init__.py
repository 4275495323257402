"""Verification: the staged certification pipeline, complete verifiers (BaB, MILP), ONNX/VNN-LIB export.

Main entry points:

- :func:`certify_dataset` (``certify.py``): attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP per point,
  JSON lines out, resumable and shardable; :func:`merge` and :func:`format_summary` for the results;
- :func:`bab_verify` / :func:`milp_verify`: complete verification of one box on the dense network;
- :func:`export_onnx`, :func:`export_vnnlib`, :func:`parse_vnnlib`, :func:`export_benchmark` (``export.py``).
"""
from certdist.verification.bab import BabResult, bab_verify
from certdist.verification.certify import (COMPLETE_METHODS, STATUSES, CertifyConfig, certify_dataset, certify_point,
                                           eval_copy, format_summary, merge, read_records, summarize,
                                           validate_counterexample)
from certdist.verification.dense import DenseNet, TooLargeError, dense_from_model
from certdist.verification.export import (VnnlibProperty, export_benchmark, export_onnx, export_vnnlib,
                                          parse_vnnlib, run_onnx)
from certdist.verification.milp import MilpResult, milp_verify

__all__ = ["BabResult", "COMPLETE_METHODS", "CertifyConfig", "DenseNet", "MilpResult", "STATUSES", "TooLargeError",
           "VnnlibProperty", "bab_verify", "certify_dataset", "certify_point", "dense_from_model", "eval_copy",
           "export_benchmark", "export_onnx", "export_vnnlib", "format_summary", "merge", "milp_verify",
           "parse_vnnlib", "read_records", "run_onnx", "summarize", "validate_counterexample"]
