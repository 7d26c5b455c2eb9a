"""Image classification DataModules: digits (offline), MNIST, CIFAR-10 and any local image folder.

Every batch is ``(x, y)``: ``x`` float32 images ``(B, C, H, W)`` (digits: ``(B, 64)``), ``y`` int64
class indices ``(B,)``. The class-folder helpers and the shared loader base here are also used by
the audio DataModules.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from astraora.data.common import (ResumableLoader, ResumableSampler, SeededItems, default_num_workers, eval_shard, missing_dataset,
                                  resolve_data_dir, seeded_split)
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

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 64, num_workers: int | None = None):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()

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
          looked_in: Path, how: str) -> None:
    """Make sure a dataset is on disk: try ``download`` when it is missing (any failure, e.g. no
    network, is logged in one line) and raise the one-line DatasetNotFoundError if still missing."""
    if present():
        return
    if download is not None:
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

    def augments(self) -> bool:
        return False  # items are fixed tensors

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 64,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, num_workers: int | None = 0):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.fractions = three_way_fractions(val_fraction, test_fraction)

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

    def augments(self) -> bool:
        return False  # items are fixed tensors

    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    MEAN, STD = (0.1307,), (0.3081,)

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 128, val_fraction: float = 0.1,
                 download: bool = True, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.val_fraction = float(val_fraction)
        self.download = bool(download)
        self.raw = self.data_dir / "MNIST" / "raw"

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
              "download the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
              "into that directory")

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

def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python pickle batch → images uint8 ``(N, 3, 32, 32)``, labels int64 ``(N,)``."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - truncated pickle, wrong keys or sizes
        raise DataFileError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}).") from None
    if len(data) != len(labels):
        raise DataFileError(f"{path} has {len(data)} images but {len(labels)} labels.")
    return torch.from_numpy(data), torch.from_numpy(labels)


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (32×32 RGB, 10 classes) from ``data_dir/cifar-10-batches-py`` (the python pickle batches).

    Downloaded (with checksum) when missing and ``download`` is true. The official 50k training set
    is split (seeded) into train and val (``val_fraction``); the official test batch is the test
    split. Training adds random crops with 4-pixel zero padding and horizontal flips (when
    ``augment``), drawn per item from ``(seed, epoch, index)`` so that a resumed run repeats them.
    Batches: ``x (B, 3, 32, 32)`` float32 standardised per channel, ``y (B,)`` int64.
    """

    FOLDER = "cifar-10-batches-py"
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
    TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
    MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 128, val_fraction: float = 0.1,
                 augment: bool = True, download: bool = True, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.val_fraction = float(val_fraction)
        self.augment = bool(augment)
        self.download = bool(download)
        self.folder = self.data_dir / self.FOLDER

    def _present(self) -> bool:
        return all((self.folder / name).is_file() for name in (*self.TRAIN_FILES, "test_batch"))

    def _fetch(self, download: bool) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        def download_archive():
            download_and_extract_archive(self.URL, self.data_dir, md5=self.ARCHIVE_MD5)

        fetch("cifar10", self._present, download_archive if download else None, self.folder,
              f"download {self.URL} and extract it into {self.data_dir}")

    def prepare_data(self) -> None:
        self._fetch(self.download)

    def build_splits(self):
        self._fetch(download=False)
        batches = [read_cifar_batch(self.folder / name) for name in self.TRAIN_FILES]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        test_images, test_labels = read_cifar_batch(self.folder / "test_batch")
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
                     val_fraction: float, test_fraction: float,
                     name: str) -> tuple[list[str], dict[str, list[Item]]]:
    """Class names and ``{"train"|"val"|"test": [(file, label)]}`` of a ``root/<class>/<file>`` tree.

    With ``root/train/`` (and optionally ``val/`` and ``test/``) those folders are the splits and a
    missing val or test split is carved from train; otherwise the whole tree is split. Carving is
    reproducible from ``seed``. Unreadable files are skipped with one counted warning.
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
    warn_skipped(name, skipped)
    for split, fraction in (("train", None), ("val", val_fraction), ("test", test_fraction)):
        if not splits[split] and not (split in carve and fraction == 0):
            how = (f"add files or raise task.datamodule.{split}_fraction (now {fraction})" if split in carve
                   else "add files to it")
            raise DataFileError(f"dataset {name!r}: the {split} split of {root} is empty ({len(pool)} files in "
                                f"all); {how}.")
    return classes, splits


# -------------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_is_readable(path: Path) -> bool:
    """Cheap check at setup: the header parses and (for PNG and the like) the data checksums hold."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad files
        return False


class ImageFiles(Dataset):
    """Image files with labels; items ``(transform(image as "L" or "RGB"), label)``."""

    def __init__(self, items: list[Item], mode: str, transform: Callable):
        self.items, self.mode, self.transform = items, mode, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except Exception as exc:  # noqa: BLE001 - e.g. a JPEG truncated after its header
            raise DataFileError(f"{path} is an unreadable image ({type(exc).__name__}: {exc}).") from None
        return self.transform(image), label


class ImageFolderDataModule(ClassificationDataModule):
    """Any ``root/<class>/<image>`` tree (torchvision ImageFolder semantics), given by ``task.root``.

    Images are converted to ``channels`` (1: grey, 3: RGB), resized on the short side to
    ``image_size`` and centre-cropped square; training adds horizontal flips when ``augment``,
    drawn per item from ``(seed, epoch, index)`` so that a resumed run repeats them. Splits as in :func:`split_class_tree`. Batches: ``x (B, channels, image_size, image_size)``
    float32 in [-1, 1], ``y (B,)`` int64 in sorted class-name order.
    """

    def __init__(self, root=None, data_dir=None, seed: int = 0, batch_size: int = 64, image_size: int = 64,
                 channels: int = 3, val_fraction: float = 0.1, test_fraction: float = 0.1, augment: bool = True,
                 num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers)
        if channels not in (1, 3):
            raise ConfigError(f"task.datamodule.channels={channels} must be 1 (grey) or 3 (RGB).")
        self.root = root
        self.image_size, self.channels, self.augment = int(image_size), int(channels), bool(augment)
        self.fractions = three_way_fractions(val_fraction, test_fraction)[1:]
        self.classes: list[str] = []

    def build_splits(self):
        root = locate_root(self.root, self.data_dir, "task.root", "DIR/<class>/<image>")
        self.classes, splits = split_class_tree(root, IMAGE_EXTENSIONS, image_is_readable, self.seed,
                                                *self.fractions, "image_folder")
        resize = [v2.PILToTensor(), v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size)]
        scale = to_float([0.5] * self.channels, [0.5] * self.channels)
        plain = v2.Compose([*resize, *scale])
        augmented = v2.Compose([*resize, v2.RandomHorizontalFlip(), *scale]) if self.augment else plain
        mode = "L" if self.channels == 1 else "RGB"
        return (ImageFiles(splits["train"], mode, augmented),
                ImageFiles(splits["val"], mode, plain),
                ImageFiles(splits["test"], mode, plain))

    def model_kwargs(self) -> dict:
        return {"num_classes": len(self.classes), "in_channels": self.channels}
