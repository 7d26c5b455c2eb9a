"""Image classification DataModules: digits (offline), MNIST, CIFAR-10 and any local image folder.

Every batch is ``(x, y)``: ``x`` float32 images ``(B, C, H, W)`` (digits: ``(B, 64)``), ``y`` int64
class indices ``(B,)``. The class-folder helpers and the shared loader base here are also used by
the audio DataModules.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from astraora.data.common import (ResumableLoader, ResumableSampler, SeededItems, default_num_workers, eval_shard,
                                  missing_dataset, resolve_data_dir, seeded_split, unreachable)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError

log = logging.getLogger(__name__)

Item = tuple[Path, int]  # (file, class index)


class ClassificationDataModule(L.LightningDataModule):
    """What the classification DataModules share: loader settings and seeded shuffling.

    Subclasses implement ``build_splits()`` (train, val, test datasets) and ``model_kwargs()``;
    downloadable ones also ``prepare_data()``. ``setup`` builds the splits once for all stages.

    The training loader serves each epoch in an order fixed by ``(seed, epoch)`` and builds every
    training item under a generator seeded from ``(seed, epoch, index)`` (see
    :class:`astraora.data.common.SeededItems`), so random augmentation is the same with any number of
    workers, under DDP and after a mid-epoch resume. Validation and test items are not augmented.
    """

    name = "dataset"  # the task's name in messages

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 64, num_workers: int | None = None):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"task.datamodule.batch_size={batch_size} must be a positive number of examples.")
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def augments(self) -> bool:
        """Whether building a training item draws random numbers (then it is seeded per item);
        data sets without augmentation skip that per-item cost."""
        return bool(getattr(self, "augment", True))

    def model_kwargs(self) -> dict:
        raise NotImplementedError

    def split_source(self, split: str) -> str:
        """Where ``split`` comes from, for the message when it is empty (the folder and the keys that
        shape it)."""
        return f"from {self.data_dir}"

    def needs_split(self, split: str) -> bool:
        """Whether an empty ``"val"`` or ``"test"`` split is an error: true where the data or the config
        promised examples for it, false where the config left it empty on purpose (a fraction of 0)."""
        return False

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            splits = self.build_splits()
            self.check_splits(*splits)
            self.train_set, self.val_set, self.test_set = splits

    def check_splits(self, train: Dataset, val: Dataset, test: Dataset) -> None:
        """Refuse to start without a training batch: an empty (or one-example) training split would
        train 0 steps (or fail in BatchNorm at the first step), and an empty split that the task
        needs would leave its metrics out. One line naming the source and the keys."""
        if len(train) < 2:
            raise DataFileError(f"dataset {self.name!r}: the training split {self.split_source('train')} has "
                                f"{len(train)} example(s); training needs at least 2 (one batch).")
        for split, dataset in (("val", val), ("test", test)):
            if len(dataset) == 0 and self.needs_split(split):
                raise DataFileError(f"dataset {self.name!r}: the {split} split {self.split_source(split)} is empty.")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        settings = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        if not train:
            return DataLoader(dataset, sampler=eval_shard(len(dataset), self), **settings)
        # the epoch's order depends on (seed, epoch) only and survives a mid-epoch resume; each
        # item's augmentation depends on (seed, epoch, index) only (the sampler's keys carry the
        # epoch into the workers); a last training batch of one sample would break BatchNorm
        seeded = self.augments()
        return ResumableLoader(SeededItems(dataset, self.seed) if seeded else dataset,
                               ResumableSampler(len(dataset), self.seed, keys=seeded),
                               self, drop_last=len(dataset) > self.batch_size, **settings)


def fetch(name: str, present: Callable[[], bool], download: Callable[[], object] | None,
          looked_in: Path, how: str, url: str) -> None:
    """Make sure a dataset is on disk: try ``download`` when it is missing (any failure, e.g. a broken
    mirror, is logged in one line) and raise the one-line DatasetNotFoundError if still missing.

    Offline, the download is not started at all: one bounded connection attempt to ``url``'s server
    (:func:`astraora.data.common.unreachable`) fails first, and the error says so and what to do
    (``how``, which names the URL to fetch by hand and where to put it)."""
    if present():
        return
    if download is not None:
        reason = unreachable(url)
        if reason is not None:
            raise missing_dataset(name, looked_in, f"{reason}; {how}, or run again with network access.")
        try:
            download()
        except Exception as exc:  # noqa: BLE001 - offline, broken mirror, bad checksum: all end below
            log.warning("%s: download failed: %s", name, (str(exc).strip() or type(exc).__name__).splitlines()[0])
    if not present():
        again = ("or run again with network access" if download is not None
                 else "or set task.datamodule.download=true to fetch it")
        raise missing_dataset(name, looked_in, f"{how}, {again}.")


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` and labels ``(N,)``; items ``(transform(image), label)``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    """uint8 image → float32 in [0, 1] → standardised per channel."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def check_val_fraction(val_fraction: float) -> float:
    """The share of an official training set held out for validation: 0 (none) up to, not including, 1."""
    if not 0 <= float(val_fraction) < 1:
        raise ConfigError(f"task.datamodule.val_fraction={val_fraction} must be >= 0 and < 1.")
    return float(val_fraction)


def three_way_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float, float]:
    """(train, val, test) fractions, checked."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 "
                          "and sum to less than 1.")
    return 1 - val_fraction - test_fraction, val_fraction, test_fraction


# --------------------------------------------------------------------------------------- digits

class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's bundled 8×8 handwritten digits: 1797 images, 10 classes, fully offline.

    A seeded train/val/test split (default 70/15/15); features are standardised with the
    training split's per-pixel mean and std. Batches: ``x (B, 64)`` float32, ``y (B,)`` int64.
    ``data_dir`` is accepted like every task's but unused: the data ships with scikit-learn.
    """

    name = "digits"

    def augments(self) -> bool:
        return False  # items are fixed tensors

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 64,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, num_workers: int | None = 0):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.fractions = three_way_fractions(val_fraction, test_fraction)

    def split_source(self, split: str) -> str:
        return (f"of scikit-learn's digits (task.datamodule.val_fraction={self.fractions[1]}, "
                f"test_fraction={self.fractions[2]})")

    def needs_split(self, split: str) -> bool:
        return self.fractions[1 if split == "val" else 2] > 0

    def build_splits(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)  # (1797, 64), grey levels 0..16
        y = torch.tensor(digits.target, dtype=torch.int64)
        train, val, test = (torch.tensor(part) for part in seeded_split(len(y), self.fractions, self.seed))
        mean = x[train].mean(0)
        std = x[train].std(0).clamp_min(1.0)  # at least one grey level: near-constant border pixels stay tame
        x = (x - mean) / std
        return tuple(torch.utils.data.TensorDataset(x[part], y[part]) for part in (train, val, test))

    def model_kwargs(self) -> dict:
        return {"num_classes": 10, "in_features": 64}


# ---------------------------------------------------------------------------------------- MNIST

def read_idx(path: Path) -> Tensor:
    """An IDX file of unsigned bytes (the MNIST format; ``.gz`` or not) as a uint8 tensor of its shape."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataFileError(f"{path} is unreadable: {exc}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataFileError(f"{path} is not an IDX file of unsigned bytes (bad magic number).")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise DataFileError(f"{path} is truncated: {body.size} values where shape {shape} needs {math.prod(shape)}.")
    return torch.from_numpy(body.reshape(shape).copy())


class MNISTDataModule(ClassificationDataModule):
    """MNIST handwritten digits (28×28 grey, 10 classes) from its IDX files in ``data_dir/MNIST/raw``.

    Downloaded through torchvision when missing and ``download`` is true. The official 60k training
    set is split (seeded) into train and val (``val_fraction``); the official 10k set is the test
    split. Batches: ``x (B, 1, 28, 28)`` float32 standardised, ``y (B,)`` int64.
    """

    name = "mnist"
    URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

    def augments(self) -> bool:
        return False  # items are fixed tensors

    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    MEAN, STD = (0.1307,), (0.3081,)

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 128, val_fraction: float = 0.1,
                 download: bool = True, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.val_fraction = check_val_fraction(val_fraction)
        self.download = bool(download)
        self.raw = self.data_dir / "MNIST" / "raw"

    def split_source(self, split: str) -> str:
        return f"from {self.raw} (task.datamodule.val_fraction={self.val_fraction})"

    def needs_split(self, split: str) -> bool:
        return split == "test" or self.val_fraction > 0

    def _file(self, name: str) -> Path | None:
        """The IDX file as extracted, or else gzipped (both as torchvision's downloader leaves them)."""
        return next((p for p in (self.raw / name, self.raw / f"{name}.gz") if p.is_file()), None)

    def _present(self) -> bool:
        return all(self._file(name) for pair in self.FILES.values() for name in pair)

    def _fetch(self, download: bool) -> None:
        import torchvision

        def download_files():
            torchvision.datasets.MNIST(self.data_dir, train=True, download=True)

        fetch("mnist", self._present, download_files if download else None, self.raw,
              f"download the four *-ubyte.gz files from {self.URL} into that directory", self.URL)

    def prepare_data(self) -> None:
        self._fetch(self.download)

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        images, labels = (read_idx(self._file(name)) for name in self.FILES[split])
        if images.ndim != 3 or len(images) != len(labels):
            raise DataFileError(f"{self._file(self.FILES[split][0])}: images {tuple(images.shape)} do not "
                                f"match {len(labels)} labels.")
        return images.unsqueeze(1), labels.long()  # (N, 1, 28, 28), (N,)

    def build_splits(self):
        self._fetch(download=False)
        transform = v2.Compose(to_float(self.MEAN, self.STD))
        images, labels = self._load("train")
        train, val = seeded_split(len(labels), (1 - self.val_fraction, self.val_fraction), self.seed)
        test_images, test_labels = self._load("test")
        return (TensorImages(images[train], labels[train], transform),
                TensorImages(images[val], labels[val], transform),
                TensorImages(test_images, test_labels, transform))

    def model_kwargs(self) -> dict:
        return {"num_classes": 10, "in_channels": 1}


# ------------------------------------------------------------------------------------- CIFAR-10

def _array_reconstructor():
    """The function numpy pickles an ndarray with (``numpy.core.multiarray._reconstruct``; numpy 2
    keeps it in ``numpy._core.multiarray``), taken from numpy itself rather than by module path."""
    return np.empty(0).__reduce__()[0]


def _cifar_dtype(spec, align=0, copy=1):
    """``numpy.dtype`` as a CIFAR-10 batch calls it: the image bytes are ``uint8`` (``"u1"``), nothing else."""
    if spec not in ("u1", b"u1"):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} (a CIFAR-10 batch holds uint8 only)")
    return np.dtype("u1", bool(align), bool(copy))


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else: the only globals it admits are the three the
    official files reference (they were written by Python 2's cPickle, protocol 2):
    ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype`` (uint8 only); the rest
    of a batch is dicts, lists, strings and ints, which need no global. ``numpy._core.multiarray._reconstruct``
    is the same function under numpy 2's name (a batch re-written by Python 3 refers to it).
    Any other global (``os.system``, ``builtins.eval``, ...) raises UnpicklingError before it is
    looked up, so a planted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch does not use")
        if name == "_reconstruct":
            return _array_reconstructor()
        return np.ndarray if name == "ndarray" else _cifar_dtype


# MD5 of each file of the official cifar-10-python.tar.gz (the archive's own MD5 is ARCHIVE_MD5 below).
CIFAR10_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
               "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}


def read_cifar_batch(path: Path, md5: str | None = None) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python pickle batch → images uint8 ``(N, 3, 32, 32)``, labels int64 ``(N,)``.

    With ``md5`` the file's MD5 must be that one (the official file's) before it is unpickled.
    It is always unpickled by :class:`CifarUnpickler`, which admits only what the format needs, and
    its contents are checked: a dict with ``data`` (uint8, N × 3072) and ``labels`` (N ints in 0..9).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFileError(f"{path} is unreadable ({type(exc).__name__}: {exc}).") from None
    if md5 is not None:
        digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if digest != md5:
            raise DataFileError(f"{path} has MD5 {digest}, not {md5} (the official CIFAR-10 file's); delete the "
                                "folder to download it again, or set task.datamodule.verify=false to use your own "
                                "batches.")
    try:
        entry = CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data, labels = entry["data"], entry["labels"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise ValueError(f"'data' is not a uint8 array of N × 3072 bytes ({type(data).__name__})")
        if not (isinstance(labels, list) and all(type(v) is int and 0 <= v < 10 for v in labels)):
            raise ValueError("'labels' is not a list of class indices 0..9")
    except Exception as exc:  # noqa: BLE001 - refused global, truncated pickle, wrong keys or types
        raise DataFileError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}).") from None
    if len(data) != len(labels):
        raise DataFileError(f"{path} has {len(data)} images but {len(labels)} labels.")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.tensor(labels, dtype=torch.int64)


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (32×32 RGB, 10 classes) from ``data_dir/cifar-10-batches-py`` (the python pickle batches).

    Downloaded (with checksum) when missing and ``download`` is true. With ``verify`` (the default)
    each batch file must have the official file's MD5 before it is read; every batch is unpickled by
    :class:`CifarUnpickler`, which refuses any global the format does not use, so a planted file cannot
    run code even with ``verify=False`` (for your own batches in this format). The official 50k training set
    is split (seeded) into train and val (``val_fraction``); the official test batch is the test
    split. Training adds random crops with 4-pixel zero padding and horizontal flips (when
    ``augment``), drawn per item from ``(seed, epoch, index)`` so that a resumed run repeats them.
    Batches: ``x (B, 3, 32, 32)`` float32 standardised per channel, ``y (B,)`` int64.
    """

    name = "cifar10"
    FOLDER = "cifar-10-batches-py"
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
    TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
    MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 128, val_fraction: float = 0.1,
                 augment: bool = True, download: bool = True, verify: bool = True, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.val_fraction = check_val_fraction(val_fraction)
        self.augment = bool(augment)
        self.download = bool(download)
        self.verify = bool(verify)
        self.folder = self.data_dir / self.FOLDER

    def split_source(self, split: str) -> str:
        return f"from {self.folder} (task.datamodule.val_fraction={self.val_fraction})"

    def needs_split(self, split: str) -> bool:
        return split == "test" or self.val_fraction > 0

    def _read(self, name: str) -> tuple[Tensor, Tensor]:
        return read_cifar_batch(self.folder / name, CIFAR10_MD5[name] if self.verify else None)

    def _present(self) -> bool:
        return all((self.folder / name).is_file() for name in (*self.TRAIN_FILES, "test_batch"))

    def _fetch(self, download: bool) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        def download_archive():
            download_and_extract_archive(self.URL, self.data_dir, md5=self.ARCHIVE_MD5)

        fetch("cifar10", self._present, download_archive if download else None, self.folder,
              f"download {self.URL} and extract it into {self.data_dir}", self.URL)

    def prepare_data(self) -> None:
        self._fetch(self.download)

    def build_splits(self):
        self._fetch(download=False)
        batches = [self._read(name) for name in self.TRAIN_FILES]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        test_images, test_labels = self._read("test_batch")
        plain = v2.Compose(to_float(self.MEAN, self.STD))
        augmented = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                *to_float(self.MEAN, self.STD)])
        train, val = seeded_split(len(labels), (1 - self.val_fraction, self.val_fraction), self.seed)
        return (TensorImages(images[train], labels[train], augmented if self.augment else plain),
                TensorImages(images[val], labels[val], plain),
                TensorImages(test_images, test_labels, plain))

    def model_kwargs(self) -> dict:
        return {"num_classes": 10, "in_channels": 3}


# ------------------------------------------------------------------------- folders of class folders

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def warn_skipped(name: str, skipped: Sequence[Path], shown: int = 20) -> None:
    """One counted warning naming the skipped files (the first ``shown`` of them), from the logger
    ``astraora.data.<name>`` (the dataset's name, whichever module reads it)."""
    if skipped:
        more = f" (and {len(skipped) - shown} more)" if len(skipped) > shown else ""
        logging.getLogger(f"astraora.data.{name}").warning("%s: skipped %d unreadable file(s): %s%s", name, len(skipped),
                    ", ".join(map(str, skipped[:shown])), more)


def locate_root(root, data_dir: Path, key: str, layout: str) -> Path:
    """The user's folder from ``task.root``: absolute, or relative to the working directory or to
    ``paths.data_dir``."""
    if root is None:
        raise ConfigError(f"{key} is not set: pass {key}=DIR with DIR laid out as {layout}.")
    path = Path(root).expanduser()
    if not path.is_absolute() and not path.exists() and (data_dir / path).exists():
        path = data_dir / path
    return path


def class_files(folder: Path, classes: Sequence[str], extensions: Sequence[str],
                readable: Callable[[Path], bool], skipped: list[Path]) -> list[Item]:
    """``(file, class index)`` for the files under ``folder/<class>/`` (recursively, sorted) with one of
    the ``extensions``. Files that fail ``readable`` are appended to ``skipped``; a class folder left
    without a single file is an error naming it."""
    items = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a val/test folder may lack some classes
        found = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                       and not p.name.startswith("."))
        good = [p for p in found if readable(p)]
        skipped.extend(sorted(set(found) - set(good)))
        if not good:
            raise DataFileError(f"class folder {class_dir} has no readable files ({', '.join(extensions)}).")
        items.extend((p, label) for p in good)
    return items


def split_class_tree(root: Path, extensions: Sequence[str], readable: Callable[[Path], bool], seed: int,
                     val_fraction: float, test_fraction: float, name: str,
                     report: Callable[[Sequence[Path]], None] | None = None) -> tuple[list[str], dict[str, list[Item]]]:
    """Class names and ``{"train"|"val"|"test": [(file, label)]}`` of a ``root/<class>/<file>`` tree.

    With ``root/train/`` (and optionally ``val/`` and ``test/``) those folders are the splits and a
    missing val or test split is carved from train; otherwise the whole tree is split. Carving is
    reproducible from ``seed``. Unreadable files are skipped with one counted warning (or handed to
    ``report``, which then says why they were skipped).
    """
    layout = f"{root}/<class>/<file> (optionally under train/, val/, test/)"
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset {name!r}: {root} is not a folder; "
                                   f"set task.root to one laid out as {layout}.")
    given = {split: next((root / f for f in folders if (root / f).is_dir()), None)
             for split, folders in SPLIT_FOLDERS.items()}
    pool_dir = given["train"] or root
    classes = sorted(p.name for p in pool_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"dataset {name!r}: no class folders in {pool_dir}; expected {layout}.")
    if len(classes) < 2:
        raise DataFileError(f"dataset {name!r}: {pool_dir} has {len(classes)} class folder ({classes[0]}); "
                            "a classifier needs at least 2, one folder per class.")
    skipped: list[Path] = []
    pool = class_files(pool_dir, classes, extensions, readable, skipped)
    carve = [split for split in ("val", "test") if given[split] is None]
    fractions = {"val": val_fraction, "test": test_fraction}
    carved_fractions = [fractions[s] for s in carve]
    kept, *carved = seeded_split(len(pool), (1 - sum(carved_fractions), *carved_fractions), seed)
    splits = {"train": [pool[i] for i in kept]} | {s: [pool[i] for i in part] for s, part in zip(carve, carved)}
    for split in ("val", "test"):
        if given[split] is not None:
            unknown = sorted({p.name for p in given[split].iterdir() if p.is_dir()} - set(classes))
            if unknown:
                raise DataFileError(f"{given[split]} has class folders {unknown} that {pool_dir} does not have.")
            splits[split] = class_files(given[split], classes, extensions, readable, skipped)
    (report or (lambda files: warn_skipped(name, files)))(skipped)
    for split, fraction in (("train", None), ("val", val_fraction), ("test", test_fraction)):
        if not splits[split] and not (split in carve and fraction == 0):
            how = (f"add files or raise task.datamodule.{split}_fraction (now {fraction})" if split in carve
                   else "add files to it")
            raise DataFileError(f"dataset {name!r}: the {split} split of {root} is empty ({len(pool)} files in "
                                f"all); {how}.")
    return classes, splits


# -------------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# The default of task.datamodule.max_pixels: every photo of a camera up to 50 MP (45 MP full frame,
# 48/50 MP phones) passes; decoding one through ImageFiles costs about 11 bytes a pixel at its peak
# (measured: +430 MB for 40 MP, +690 MB for 64 MP), so ≤ ~0.55 GB per image and DataLoader worker.
# Decompression bombs (a few hundred kB that decode to 100+ MP) are refused from their header.
MAX_PIXELS = 50_000_000


def pil_pixel_limit() -> int:
    """Pillow refuses to open images over twice ``Image.MAX_IMAGE_PIXELS`` (DecompressionBombError)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**62


def check_max_pixels(max_pixels) -> int:
    limit = pil_pixel_limit()
    if not (isinstance(max_pixels, int) and not isinstance(max_pixels, bool) and 0 < max_pixels <= limit):
        raise ConfigError(f"task.datamodule.max_pixels={max_pixels!r} must be a whole number of pixels from 1 to "
                          f"{limit} (Pillow's own limit).")
    return max_pixels


def open_image(path: Path) -> Image.Image:
    """``Image.open`` (the header only, nothing decoded yet) without Pillow's DecompressionBombWarning:
    the caller compares the size with ``max_pixels`` itself; over Pillow's hard limit it still raises
    DecompressionBombError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


class ImageCheck:
    """The setup check of an image file, ``readable(path) -> bool``: the header parses, the image has
    at most ``max_pixels`` pixels (read from the header: an oversized image is never decoded) and (for
    PNG and the like) the data checksums hold. Oversized images, Pillow's DecompressionBombError
    included, are collected in ``too_large``; the rest of the refused ones are unreadable."""

    def __init__(self, max_pixels: int = MAX_PIXELS):
        self.max_pixels = int(max_pixels)
        self.too_large: list[Path] = []

    def __call__(self, path: Path) -> bool:
        try:
            with open_image(path) as image:
                if image.width * image.height > self.max_pixels:
                    self.too_large.append(path)
                    return False
                image.verify()
            return True
        except Image.DecompressionBombError:
            self.too_large.append(path)
            return False
        except Exception:  # noqa: BLE001 - PIL raises many kinds for bad files
            return False

    def note(self) -> str:
        """Why files were skipped for size, for a message ('' when none was)."""
        return (f"{len(self.too_large)} image(s) over task.datamodule.max_pixels={self.max_pixels} were skipped "
                "without decoding" if self.too_large else "")

    def report(self, name: str, skipped: Sequence[Path]) -> None:
        """One counted warning for the oversized images and one for the unreadable ones."""
        large = set(self.too_large)
        if large:
            more = f" (and {len(large) - 20} more)" if len(large) > 20 else ""
            shown = ", ".join(map(str, self.too_large[:20])) + more
            logging.getLogger(f"astraora.data.{name}").warning(
                "%s: skipped %d image(s) with more than task.datamodule.max_pixels=%d pixels, without decoding them: "
                "%s", name, len(large), self.max_pixels, shown)
        warn_skipped(name, [p for p in skipped if p not in large])


def image_is_readable(path: Path) -> bool:
    """Cheap check at setup with the default pixel limit (see :class:`ImageCheck`)."""
    return ImageCheck()(path)


class ImageFiles(Dataset):
    """Image files with labels; items ``(transform(image as "L" or "RGB"), label)``. An image over
    ``max_pixels`` (replaced after setup) is refused from its header, before any decoding."""

    def __init__(self, items: list[Item], mode: str, transform: Callable, max_pixels: int = MAX_PIXELS):
        self.items, self.mode, self.transform, self.max_pixels = items, mode, transform, int(max_pixels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        try:
            with open_image(path) as image:
                if image.width * image.height > self.max_pixels:
                    raise DataFileError(f"{path} has {image.width} × {image.height} pixels, more than "
                                        f"task.datamodule.max_pixels={self.max_pixels}.")
                image = image.convert(self.mode)
        except DataFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a JPEG truncated after its header
            raise DataFileError(f"{path} is an unreadable image ({type(exc).__name__}: {exc}).") from None
        return self.transform(image), label


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``root/<class>/<image>`` tree (torchvision ImageFolder semantics), given by ``task.root``.

    Images are converted to ``channels`` (1: grey, 3: RGB), resized on the short side to
    ``image_size`` and centre-cropped square; training adds horizontal flips when ``augment``,
    drawn per item from ``(seed, epoch, index)`` so that a resumed run repeats them. Splits as in
    :func:`split_class_tree`. Images with more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`)
    are skipped from their header, never decoded, with one counted warning. Batches:
    ``x (B, channels, image_size, image_size)``
    float32 in [-1, 1], ``y (B,)`` int64 in sorted class-name order.
    """

    name = "image_folder"

    def __init__(self, root=None, data_dir=None, seed: int = 0, batch_size: int = 64, image_size: int = 64,
                 channels: int = 3, val_fraction: float = 0.1, test_fraction: float = 0.1, augment: bool = True,
                 max_pixels: int = MAX_PIXELS, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        if channels not in (1, 3):
            raise ConfigError(f"task.datamodule.channels={channels} must be 1 (grey) or 3 (RGB).")
        self.max_pixels = check_max_pixels(max_pixels)
        self.root = root
        self.image_size, self.channels, self.augment = int(image_size), int(channels), bool(augment)
        self.fractions = three_way_fractions(val_fraction, test_fraction)[1:]
        self.classes: list[str] = []

    def build_splits(self):
        root = locate_root(self.root, self.data_dir, "task.root", "DIR/<class>/<image>")
        check = ImageCheck(self.max_pixels)
        try:
            self.classes, splits = split_class_tree(root, IMAGE_EXTENSIONS, check, self.seed, *self.fractions,
                                                    self.name, report=lambda files: check.report(self.name, files))
        except DataFileError as err:
            if not check.too_large:
                raise
            raise DataFileError(f"{str(err).rstrip('.')}; {check.note()}.") from None
        resize = [v2.PILToTensor(), v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size)]
        scale = to_float([0.5] * self.channels, [0.5] * self.channels)
        plain = v2.Compose([*resize, *scale])
        augmented = v2.Compose([*resize, v2.RandomHorizontalFlip(), *scale]) if self.augment else plain
        mode = "L" if self.channels == 1 else "RGB"
        return (ImageFiles(splits["train"], mode, augmented, self.max_pixels),
                ImageFiles(splits["val"], mode, plain, self.max_pixels),
                ImageFiles(splits["test"], mode, plain, self.max_pixels))

    def split_source(self, split: str) -> str:
        return f"of {self.root} (task.root)"

    def model_kwargs(self) -> dict:
        return {"num_classes": len(self.classes), "in_channels": self.channels}
