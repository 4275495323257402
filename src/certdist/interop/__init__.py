"""Interoperability with the verification community's formats (reading; writing is in
:mod:`certdist.verification.export`).

- :func:`load_onnx` (``onnx_import.py``): an ONNX file as a float32 ``nn.Sequential`` of the layers the
  verifier supports, checked against onnxruntime; anything else refused up front, naming the node.
"""
from certdist.interop.onnx_import import OnnxImportError, OnnxInput, load_onnx, onnx_input_of, read_maybe_gz

__all__ = ["OnnxImportError", "OnnxInput", "load_onnx", "onnx_input_of", "read_maybe_gz"]
