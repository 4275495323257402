"""Readers for the official on-disk formats of the supported datasets.

Every reader returns ``(images, labels)`` as torch tensors: uint8 ``[N, C, H, W]`` and int64
``[N]``. Readers check the structure of what they read (headers, keys, shapes, dtypes) and raise
:class:`~certdist.data.errors.DataError` naming the offending file; dataset-level checks (sample
counts, label ranges against the registry) are done by the caller, see
:func:`certdist.data.loading.load`.

Formats:

* IDX (MNIST, Fashion-MNIST): raw or gzip-compressed, detected by content, not by name.
* CIFAR-10 "python version": pickled batches, read from the ``.tar.gz`` archive or the
  extracted ``cifar-10-batches-py`` folder, with an unpickler restricted to the few numpy
  globals those pickles need.
* TinyImageNet: the official ``tiny-imagenet-200`` zip or extracted folder, JPEGs decoded with
  Pillow (grayscale images are converted to RGB). Labels are indices into the *sorted* list of
  wnids (the ``ImageFolder`` convention).
* ImageNet64 (downsampled ImageNet): ``.npz`` batches with ``data`` uint8 ``[N, 12288]``
  (channel-major) and 1-based ``labels``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certdist.data.errors import DataError

__all__ = [
    "read_maybe_gzip",
    "read_idx",
    "read_idx_split",
    "read_cifar10",
    "read_tinyimagenet",
    "read_imagenet64",
    "CIFAR10_BATCHES",
]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08
CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_DIR = "cifar-10-batches-py"


# ----------------------------------------------------------------------------------------- IDX
def read_maybe_gzip(path: Path) -> bytes:
    """Content of ``path``, gunzipped when it starts with the gzip magic number.

    A truncated or corrupt gzip stream (bad CRC, missing end-of-stream marker) raises DataError.
    """
    data = Path(path).read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Parse an IDX file (raw or gzipped) holding unsigned bytes.

    Args:
        path: the file.
        expected_sha256: if given, the SHA-256 hex digest the *decompressed* content must have.

    Returns:
        A writable uint8 array with the shape given by the IDX header.
    """
    path = Path(path)
    content = read_maybe_gzip(path)
    if expected_sha256 is not None:
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected_sha256:
            raise DataError(
                f"{path}: checksum mismatch: SHA-256 of the decompressed content is {actual}, "
                f"expected {expected_sha256}"
            )
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise DataError(
            f"{path}: bad magic number {content[:4].hex() or '(empty file)'}: an IDX file starts "
            "with two zero bytes, a type code and the number of dimensions"
        )
    if content[2] != _IDX_UINT8:
        raise DataError(f"{path}: IDX type code 0x{content[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = content[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(content) < header:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file has {len(content)} bytes")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    actual = len(content) - header
    if actual != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: IDX header says {shape} = {expected} bytes of data, file has {actual}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, H, W]`` and labels ``[N]`` from an IDX images file and an IDX labels file.

    Checksums are not verified here (:func:`certdist.data.sources.ensure` does that).
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected a 3-D IDX array [N, H, W], got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D IDX array [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------ CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals the CIFAR-10 batches need (numpy arrays)."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_members(path: Path, wanted: Sequence[str]) -> dict[str, tuple[str, bytes]]:
    """``{batch: (display name, bytes)}`` for each wanted batch of an archive or extracted folder."""
    found: dict[str, tuple[str, bytes]] = {}
    if path.is_dir():
        for batch in wanted:
            if (path / batch).is_file():
                found[batch] = (str(path / batch), (path / batch).read_bytes())
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if member.isfile() and parts[-1] in wanted and parts[-2:-1] == [_CIFAR_DIR]:
                        fileobj = tar.extractfile(member)
                        assert fileobj is not None  # regular files always have content
                        found[parts[-1]] = (f"{path}:{member.name}", fileobj.read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated CIFAR-10 archive ({exc})") from exc
    missing = [b for b in wanted if b not in found]
    if missing:
        where = "folder" if path.is_dir() else f"archive (looked for {_CIFAR_DIR}/<batch>)"
        raise DataError(f"{path}: CIFAR-10 {where} lacks {', '.join(missing)}")
    return found


def read_cifar10(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a CIFAR-10 split from ``cifar-10-python.tar.gz`` or the ``cifar-10-batches-py`` folder.

    Each batch must be a pickled dict with ``b"data"`` (uint8 ``[n, 3072]``, channel-major
    32x32 images) and ``b"labels"`` (``n`` ints).
    """
    path = Path(path)
    images, labels = [], []
    for batch, (display, blob) in _cifar_members(path, CIFAR10_BATCHES[split]).items():
        try:
            entry = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
        except Exception as exc:  # any unpickling failure means a corrupt batch
            raise DataError(f"{display}: not a valid CIFAR-10 pickle ({exc})") from exc
        if not isinstance(entry, dict):
            raise DataError(f"{display}: expected a pickled dict, got {type(entry).__name__}")
        for key in (b"data", b"labels"):
            if key not in entry:
                raise DataError(f"{display}: missing key {key!r} (keys: {sorted(entry)})")
        data = entry[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{display}: b'data' must be a uint8 array [N, 3072], got {got}")
        batch_labels = np.asarray(entry[b"labels"])
        if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise DataError(
                f"{display}: b'labels' must hold {len(data)} integers, got {batch_labels.dtype} {batch_labels.shape}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# -------------------------------------------------------------------------------- TinyImageNet
class _Tree:
    """Read-only view of the ``tiny-imagenet-200`` folder or zip, with names relative to its root."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self._root = ""
            self._names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            return
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path}: not a readable zip archive ({exc})") from exc
        roots = [n[: -len("wnids.txt")] for n in self._zip.namelist() if n.split("/")[-1] == "wnids.txt"]
        if not roots:
            raise DataError(f"{path}: no wnids.txt in the archive (expected tiny-imagenet-200/wnids.txt)")
        self._root = min(roots, key=len)
        self._names = sorted(
            n[len(self._root) :] for n in self._zip.namelist() if n.startswith(self._root) and not n.endswith("/")
        )

    def names(self) -> list[str]:
        """All file names, sorted, relative to the dataset root (``"train/<wnid>/images/x.JPEG"``)."""
        return self._names

    def display(self, name: str) -> str:
        """Human-readable location of ``name`` for error messages."""
        return f"{self.path}:{self._root}{name}" if self._zip else str(self.path / name)

    def read(self, name: str) -> bytes:
        """Bytes of the file ``name``; DataError when missing or unreadable."""
        try:
            if self._zip is not None:
                return self._zip.read(self._root + name)
            return (self.path / name).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{self.display(name)}: cannot read ({exc})") from exc

    def close(self) -> None:
        """Close the underlying zip file, if any."""
        if self._zip is not None:
            self._zip.close()


def _decode_jpegs(tree: _Tree, names: Sequence[str], size: int) -> torch.Tensor:
    """Decode RGB images of exactly ``size`` x ``size`` into a uint8 tensor ``[N, 3, size, size]``."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("decoding TinyImageNet JPEGs needs Pillow: pip install Pillow") from exc
    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        try:
            with Image.open(io.BytesIO(tree.read(name))) as img:
                if img.size != (size, size):
                    raise DataError(f"{tree.display(name)}: image is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
                out[i] = np.asarray(img.convert("RGB"))
        except DataError:
            raise
        except Exception as exc:  # Pillow raises many types for corrupt images
            raise DataError(f"{tree.display(name)}: cannot decode image ({exc})") from exc
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_tinyimagenet(path: Path, split: str, num_classes: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Read TinyImageNet from ``tiny-imagenet-200.zip`` or the extracted ``tiny-imagenet-200`` folder.

    ``split="train"`` reads ``train/<wnid>/images/*.JPEG``; ``split="test"`` reads the official
    validation split, ``val/images/*`` labelled by ``val/val_annotations.txt``. Label ``k`` is the
    ``k``-th wnid of ``wnids.txt`` in sorted order.
    """
    tree = _Tree(Path(path))
    try:
        wnids = tree.read("wnids.txt").decode().split()
        if len(set(wnids)) != len(wnids) or len(wnids) != num_classes:
            raise DataError(
                f"{tree.display('wnids.txt')}: expected {num_classes} distinct wnids, "
                f"found {len(set(wnids))} distinct in {len(wnids)} lines"
            )
        index = {wnid: k for k, wnid in enumerate(sorted(wnids))}
        names: list[str] = []
        labels: list[int] = []
        if split == "train":
            for name in tree.names():
                parts = name.split("/")
                if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and parts[3].lower().endswith(".jpeg"):
                    if parts[1] not in index:
                        raise DataError(f"{tree.display(name)}: class {parts[1]} is not listed in wnids.txt")
                    names.append(name)
                    labels.append(index[parts[1]])
        else:
            annotations = "val/val_annotations.txt"
            for lineno, line in enumerate(tree.read(annotations).decode().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in index:
                    raise DataError(
                        f"{tree.display(annotations)}, line {lineno}: expected '<file>\\t<wnid>\\t...' "
                        f"with a wnid from wnids.txt, got {line!r}"
                    )
                names.append(f"val/images/{fields[0]}")
                labels.append(index[fields[1]])
        if not names:
            raise DataError(f"{path}: no {split} images found")
        images = _decode_jpegs(tree, names, size)
    finally:
        tree.close()
    return images, torch.tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------------------------- ImageNet64
def read_imagenet64(
    paths: Sequence[Path], num_samples: int, num_classes: int, size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read downsampled-ImageNet ``.npz`` batches into one preallocated tensor.

    Preallocating ``num_samples`` images (the official count) keeps the peak memory at one copy
    of the split (about 15.7 GB for the 64x64 training set); a different total is an error.
    Labels are converted from the official 1-based ``[1, num_classes]`` to 0-based.
    """
    images = torch.empty((num_samples, 3, size, size), dtype=torch.uint8)
    labels = torch.empty(num_samples, dtype=torch.int64)
    filled = 0
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in ("data", "labels"):
                    if key not in npz.files:
                        raise DataError(f"{path}: missing array {key!r} (arrays: {npz.files})")
                data, batch_labels = npz["data"], np.asarray(npz["labels"])
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
            raise DataError(f"{path}: 'data' must be uint8 [N, {3 * size * size}], got {data.dtype} {data.shape}")
        if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must hold {len(data)} integers, got {batch_labels.dtype} {batch_labels.shape}")
        if len(data) and (batch_labels.min() < 1 or batch_labels.max() > num_classes):
            raise DataError(
                f"{path}: labels must be 1-based in [1, {num_classes}], got range "
                f"[{batch_labels.min()}, {batch_labels.max()}]"
            )
        if filled + len(data) > num_samples:
            raise DataError(f"{path}: the files hold more than the expected {num_samples} samples")
        images[filled : filled + len(data)] = torch.from_numpy(data).view(-1, 3, size, size)
        labels[filled : filled + len(data)] = torch.from_numpy(batch_labels.astype(np.int64) - 1)
        filled += len(data)
    if filled != num_samples:
        raise DataError(f"{', '.join(str(p) for p in paths)}: expected {num_samples} samples, found {filled}")
    return images, labels
