"""Static facts about the supported datasets, and where their files live on disk."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DatasetInfo", "DATASETS", "SPLITS", "dataset_info", "default_data_dir", "dataset_folder"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Description of one dataset.

    Attributes:
        name: registry key (``"mnist"``, ``"cifar10"``, ...).
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        channels: image channels (1 or 3).
        size: height = width of the (square) images.
        mean, std: per-channel statistics of the training images scaled to [0, 1]. The values
            for TinyImageNet and ImageNet64 are the approximate ones used throughout the
            certified-training literature, not recomputed bit-exactly.
        augment: whether the standard training recipe augments this dataset (random crop with
            zero padding + horizontal flip). False for the MNIST-like datasets.
        crop_padding: zero padding of the random crop when ``augment`` is True: 4 for the
            32x32 CIFAR-10 (the usual recipe), 8 for the 64x64 datasets (same 1/8 ratio);
            0 when ``augment`` is False. Use :func:`dataclasses.replace` for another value.
        num_train, num_test: official number of samples in each split. For TinyImageNet the
            test split is the official validation split (the official test split is unlabeled);
            for ImageNet64 it is the official validation split as well.
    """

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    crop_padding: int
    num_train: int
    num_test: int

    def num_samples(self, split: str) -> int:
        """Official number of samples of ``split`` (``"train"`` or ``"test"``)."""
        check_split(split)
        return self.num_train if split == "train" else self.num_test


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), False, 0, 60_000, 10_000),
        DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), False, 0, 60_000, 10_000),
        DatasetInfo(
            "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), True, 4,
            50_000, 10_000,
        ),
        DatasetInfo(
            "tinyimagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), True, 8,
            100_000, 10_000,
        ),
        DatasetInfo(
            "imagenet64", 1000, 3, 64, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758), True, 8,
            1_281_167, 50_000,
        ),
        # A generated, file-free 4-class task (8x8 grey images, one bright quadrant per class plus
        # noise) for smoke tests and examples; see certdist.data.loading.synthetic.
        DatasetInfo("synthetic", 4, 1, 8, (0.3,), (0.3,), False, 0, 2_000, 500),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` registered under ``name``; ValueError listing known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}") from None


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is ``"train"`` or ``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def default_data_dir() -> Path:
    """``$CERTDIST_DATA`` when set and non-empty, else ``./data`` (relative to the working directory)."""
    env = os.environ.get("CERTDIST_DATA")
    return Path(env) if env else Path("data")


def dataset_folder(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<data_dir>/<name>`` (``data_dir`` defaulting to :func:`default_data_dir`); not created here."""
    dataset_info(name)
    return Path(data_dir if data_dir is not None else default_data_dir()) / name
