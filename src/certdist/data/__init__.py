"""Datasets for certified training: MNIST, Fashion-MNIST, CIFAR-10, TinyImageNet, ImageNet64.

Typical use::

    from certdist.data import load, batches
    train = load("cifar10", "train")          # fetched, verified, decoded and cached on first use
    g = torch.Generator().manual_seed(0)
    for x, y in batches(train, 128, shuffle=True, generator=g, augment=True):
        ...                                     # x float32 in [0, 1], not normalized

Raw files live in ``<data_dir>/<name>/`` (``data_dir`` defaults to ``$CERTDIST_DATA`` or
``./data``); see :mod:`certdist.data.sources` for where they are obtained from and how they are
verified, and :mod:`certdist.data.formats` for the formats.
"""
from certdist.data.errors import DataError
from certdist.data.loading import TensorData, batches, holdout, load
from certdist.data.registry import DATASETS, DatasetInfo, dataset_info, default_data_dir
from certdist.data.sources import fetch
from certdist.data.transforms import random_crop, random_hflip

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "TensorData",
    "batches",
    "dataset_info",
    "default_data_dir",
    "fetch",
    "holdout",
    "load",
    "random_crop",
    "random_hflip",
]
