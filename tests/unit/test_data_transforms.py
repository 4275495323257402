"""Tests of the batched augmentations and of the batch iterator of certdist.data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certdist.data import DATASETS, TensorData, batches, random_crop, random_hflip


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 16, c: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=seeded(123)) + 0.1  # strictly positive: padding is visible


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x, pad = images(), 2
    out = random_crop(x, pad, seeded())
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # offsets are drawn per sample


def test_random_crop_deterministic_and_uint8() -> None:
    x = images()
    assert torch.equal(random_crop(x, 3, seeded(5)), random_crop(x, 3, seeded(5)))
    assert not torch.equal(random_crop(x, 3, seeded(5)), random_crop(x, 3, seeded(6)))
    assert torch.equal(random_crop(x, 0, seeded()), x)
    xb = (x * 200).to(torch.uint8)
    assert random_crop(xb, 2, seeded()).dtype == torch.uint8
    with pytest.raises(ValueError, match="padding"):
        random_crop(x, -1, seeded())
    with pytest.raises(ValueError, match="batch"):
        random_crop(x[0], 2, seeded())


def test_random_hflip() -> None:
    x = images(b=64)
    assert torch.equal(random_hflip(x, seeded(), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, seeded(), p=0.0), x)
    out = random_hflip(x, seeded(1))
    assert torch.equal(out, random_hflip(x, seeded(1)))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all()) and 0 < int(flipped.sum()) < 64


def tensor_data(name: str, n: int = 10) -> TensorData:
    info = DATASETS[name]
    imgs = torch.randint(0, 256, (n, info.channels, info.size, info.size), dtype=torch.uint8, generator=seeded())
    return TensorData(imgs, torch.arange(n) % info.num_classes, info)


def test_batches_shapes_dtypes_ranges() -> None:
    data = tensor_data("cifar10")
    out = list(batches(data, 4, shuffle=False, generator=None))
    assert [len(y) for _, y in out] == [4, 4, 2]
    x, y = out[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, data.images[:4].float() / 255)
    assert [len(y) for _, y in batches(data, 4, shuffle=False, generator=None, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(data, 0, shuffle=False, generator=None))


def test_batches_shuffle_and_augment_deterministic() -> None:
    data = tensor_data("cifar10")
    run = lambda seed: list(batches(data, 3, shuffle=True, generator=seeded(seed), augment=True))  # noqa: E731
    first, again = run(0), run(0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == data.labels.sort().values.tolist()
    plain = torch.cat([x for x, _ in batches(data, 10, shuffle=False, generator=seeded(0))])
    augmented = torch.cat([x for x, _ in batches(data, 10, shuffle=False, generator=seeded(0), augment=True)])
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


def test_batches_augment_is_noop_for_mnist() -> None:
    data = tensor_data("mnist")
    (x, _), = batches(data, 10, shuffle=False, generator=seeded(), augment=True)
    assert torch.equal(x, data.images.float() / 255)
