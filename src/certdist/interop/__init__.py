"""Interoperability with the verification community's formats: ONNX networks and VNN-LIB properties.

- :func:`load_onnx` (``onnx_import.py``): an ONNX file as a float32 ``nn.Sequential`` of the layers the
  verifier supports, checked against onnxruntime; anything else refused up front, naming the node.
- :func:`export_onnx` (``onnx_export.py``): the eval-mode network as ONNX (one rule per layer type),
  checked against torch with the numpy evaluator :func:`run_onnx` (``onnx_numpy.py``) and onnxruntime.
- :func:`export_vnnlib` / :func:`parse_vnnlib` (``vnnlib.py``): robustness properties in the VNN-COMP
  format, and general properties read back.
- :func:`export_benchmark` (``benchmark.py``): a VNN-COMP benchmark folder (``onnx/``, ``vnnlib/``,
  ``instances.csv``).
"""
from certdist.interop.benchmark import export_benchmark
from certdist.interop.onnx_export import check_onnx, export_onnx
from certdist.interop.onnx_import import OnnxImportError, OnnxInput, load_onnx, onnx_input_of, read_maybe_gz
from certdist.interop.onnx_numpy import run_onnx
from certdist.interop.vnnlib import VnnlibProperty, export_vnnlib, parse_vnnlib

__all__ = ["OnnxImportError", "OnnxInput", "VnnlibProperty", "check_onnx", "export_benchmark", "export_onnx",
           "export_vnnlib", "load_onnx", "onnx_input_of", "parse_vnnlib", "read_maybe_gz", "run_onnx"]
