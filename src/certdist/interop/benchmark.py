"""A VNN-COMP benchmark folder: the ONNX network, one VNN-LIB property per test point and
``instances.csv`` (:func:`export_benchmark`)."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import nn

from certdist.interop.onnx_export import export_onnx
from certdist.interop.vnnlib import export_vnnlib
from certdist.models.support import check_supported

_OWNED = re.compile(r"(onnx/[^/\\]+\.onnx|vnnlib/prop_\d+_eps_[^/\\]+\.vnnlib)")


def _earlier_export(out: Path) -> set[str]:
    """The files (relative paths) of an earlier :func:`export_benchmark` into ``out``: the ONNX and VNN-LIB
    files its ``instances.csv`` lists and every ``vnnlib/prop_<index>_eps_<eps>.vnnlib``; only names of the
    forms export writes, never other files."""
    owned: set[str] = set()
    csv_path = out / "instances.csv"
    if csv_path.is_file():
        for line in csv_path.read_text(errors="replace").splitlines():
            owned |= {rel.strip() for rel in line.split(",")[:2] if _OWNED.fullmatch(rel.strip())}
    if (out / "vnnlib").is_dir():
        owned |= {f"vnnlib/{f.name}" for f in (out / "vnnlib").glob("prop_*_eps_*.vnnlib")
                  if _OWNED.fullmatch(f"vnnlib/{f.name}")}
    return owned


def export_benchmark(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
                     out_dir: str | os.PathLike, limit: int | None = None, timeout: float = 300.0,
                     skip_misclassified: bool = True, name: str = "model") -> Path:
    """Write ``onnx/<name>.onnx``, ``vnnlib/prop_<index>_eps_<eps>.vnnlib`` for the first ``limit``
    points (misclassified ones skipped by default) and ``instances.csv`` (``onnx,vnnlib,timeout``
    per line, paths relative to ``out_dir``). Returns the path of ``instances.csv``.

    Exporting again into the same folder replaces the earlier export: its files that this one does not
    rewrite (ONNX / VNN-LIB files its ``instances.csv`` lists, and ``vnnlib/prop_*_eps_*.vnnlib``) are
    removed, so that no stale property is left beside the new ones; other files are never touched."""
    if not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"images must be floats in [0, 1] shaped [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)} (convert uint8 images with .float() / 255)")
    check_supported(model, tuple(images.shape[1:]))  # the layer-support contract, before any copy or file
    out = Path(out_dir)
    earlier = _earlier_export(out)
    net = copy.deepcopy(model).eval()
    onnx_rel = f"onnx/{name}.onnx"
    export_onnx(net, out / onnx_rel, tuple(images.shape[1:]))
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    with torch.no_grad():
        preds = net(images[:n]).argmax(1) if n else torch.zeros(0, dtype=torch.long)
    rows = []
    num_classes = int(net(images[:1]).shape[1])
    for i in range(n):
        if skip_misclassified and int(preds[i]) != int(labels[i]):
            continue
        rel = f"vnnlib/prop_{i}_eps_{eps:.6g}.vnnlib"
        export_vnnlib(images[i], int(labels[i]), eps, num_classes, out / rel)
        rows.append(f"{onnx_rel},{rel},{timeout:g}")
    written = {onnx_rel} | {row.split(",")[1] for row in rows}
    for rel in sorted(earlier - written):
        (out / rel).unlink(missing_ok=True)
    path = out / "instances.csv"
    path.write_text("\n".join(rows) + ("\n" if rows else ""))
    return path
