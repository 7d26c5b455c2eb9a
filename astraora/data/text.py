"""Language-modelling DataModules: a text becomes a token stream cut into (idx, targets) windows.

Every DataModule here loads a corpus, turns it into token ids with a character- or byte-level
tokenizer, and serves windows of ``block_size`` tokens: ``idx = tokens[o : o + T]`` and
``targets = tokens[o + 1 : o + T + 1]``, both ``(B, T)`` int64.

* training: ``samples_per_epoch`` windows at random offsets, drawn from a generator seeded by
  ``(seed, epoch)`` alone, so an epoch's windows are the same whether or not the run was resumed
  (Lightning calls the sampler's ``set_epoch`` at the start of each epoch);
* validation / test: contiguous, non-overlapping windows covering the split in order.

Sources:

* :class:`PydocTextDataModule` (task ``pydoc_text``): the documentation prose CPython ships in
  ``pydoc_data.topics``; offline, character-level. The default corpus.
* :class:`TinyShakespeareDataModule` (``tinyshakespeare``): Karpathy's char-rnn corpus,
  downloaded once and checked against its SHA-256; character-level.
* :class:`WikiText2DataModule` (``wikitext2``): WikiText-2 (raw) from the Hugging Face Hub with its
  official splits; byte-level, so no tokenizer download.
* :class:`TextFileDataModule` (``text_file``): your own UTF-8 text file(s), character- or byte-level,
  split into contiguous chunks that are assigned to train/val/test by the seed.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import to_absolute_path
from pydoc_data.topics import topics
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from astraora.data.common import (ResumableLoader, ResumableSampler, default_num_workers, eval_shard, missing_dataset,
                                  resolve_data_dir, seeded_split, unreachable)
from astraora.errors import ConfigError, DataFileError, DatasetNotFoundError
from astraora.rng import make_generator

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """What a ``st_mode`` says the path is, for messages ("a FIFO (named pipe)", ...)."""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def not_a_text_file(path: Path, mode: int, how: str) -> DataFileError:
    return DataFileError(f"text path {path} is {file_kind(mode)}, not a regular file; {how}")


def read_regular_file(path: Path, how: str = "a regular UTF-8 text file is needed.") -> bytes:
    """The bytes of ``path``, which must be a regular file (else a one-line DataFileError that says
    what it is and ``how`` to fix it). A FIFO, a socket or a device such as /dev/zero is never read:
    the path is opened without blocking (a FIFO with no writer would block an ordinary open) and
    checked with ``fstat`` on the opened descriptor, so a file swapped after a check is caught too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise DatasetNotFoundError(f"text file {path} not found; {how}") from None
    except IsADirectoryError:
        raise not_a_text_file(path, stat.S_IFDIR, how) from None
    except OSError as err:
        raise DataFileError(f"text path {path} cannot be opened ({err.strerror or err}); {how}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_a_text_file(path, mode, how)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """One id per distinct character of the corpus, in code-point order."""

    char_level = True

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._code_points = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        missing = [c for c in dict.fromkeys(text) if c not in self._index]
        if missing:
            raise ConfigError(
                f"characters {''.join(missing)!r} do not occur in the corpus, so its character-level "
                "vocabulary cannot encode them (check generate.prompt)."
            )
        return [self._index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def encode_corpus(self, text: str) -> Tensor:
        """The whole corpus as a (N,) int32 tensor; every character must be in the vocabulary."""
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return torch.from_numpy(np.searchsorted(self._code_points, code_points).astype(np.int32))


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding; any text (and any file) can be encoded."""

    char_level = False
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_corpus(self, data: bytes) -> Tensor:
        """The raw bytes as a (N,) uint8 tensor."""
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Splits and windows
# --------------------------------------------------------------------------------------------


def check_fractions(fractions: Sequence[float], key: str) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"{key}={list(fractions)} must be three positive train/val/test fractions summing to 1.")
    return fractions


def split_by_position(tokens: Tensor, fractions: Sequence[float]) -> dict[str, Tensor]:
    """Train is the first fraction of the stream, then val, then test: (N,) → three (N_s,) slices."""
    n_train = int(fractions[0] * len(tokens))
    n_val = int(fractions[1] * len(tokens))
    return dict(zip(SPLITS, (tokens[:n_train], tokens[n_train:n_train + n_val], tokens[n_train + n_val:])))


def split_by_chunks(tokens: Tensor, fractions: Sequence[float], seed: int, chunk_size: int) -> dict[str, Tensor]:
    """Cut the stream into equal contiguous chunks of about ``chunk_size`` tokens and deal them to
    train/val/test reproducibly from ``seed``; each split is its chunks in corpus order, joined.

    Short texts get smaller chunks, enough that even the smallest split receives one.
    """
    n_chunks = max(len(tokens) // chunk_size, math.ceil(1 / min(fractions) - 1e-9))
    bounds = torch.linspace(0, len(tokens), n_chunks + 1).long().tolist()
    parts = seeded_split(n_chunks, tuple(fractions), seed)
    return {
        split: torch.cat([tokens[bounds[i]:bounds[i + 1]] for i in sorted(part)])
        for split, part in zip(SPLITS, parts)
    }


class RandomWindows(Dataset):
    """``samples_per_epoch`` windows at random offsets of a token stream, redrawn every epoch.

    The offsets of epoch e come from a generator seeded by ``(seed, "text_windows", e)`` only.
    Call :meth:`set_epoch` before each epoch (Lightning does it for the sampler, which forwards here).
    """

    def __init__(self, tokens: Tensor, block_size: int, samples_per_epoch: int, seed: int):
        self.tokens, self.block_size = tokens, block_size
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        gen = make_generator(self.seed, "text_windows", str(epoch))
        self.offsets = torch.randint(0, len(self.tokens) - self.block_size, (self.samples_per_epoch,), generator=gen)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """→ idx (T,), targets (T,) int64."""
        window = self.tokens[self.offsets[i]:self.offsets[i] + self.block_size + 1].long()
        return window[:-1], window[1:]


class ContiguousWindows(Dataset):
    """The non-overlapping windows ``tokens[iT : iT + T + 1]``, i = 0, 1, ..., in order."""

    def __init__(self, tokens: Tensor, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """→ idx (T,), targets (T,) int64."""
        start = i * self.block_size
        window = self.tokens[start:start + self.block_size + 1].long()
        return window[:-1], window[1:]


# --------------------------------------------------------------------------------------------
# The shared DataModule
# --------------------------------------------------------------------------------------------


class TextDataModule(L.LightningDataModule):
    """Tokenizer, token splits and window loaders; subclasses say where the text comes from.

    Args:
        data_dir: dataset root (``ASTRAORA_DATA_DIR`` overrides it).
        seed: seeds the training windows (and, where a source uses it, the split).
        block_size: T, tokens per window (the model's context).
        batch_size: windows per batch, for training and evaluation.
        samples_per_epoch: training windows per epoch.
    """

    name: str  # the dataset's name in messages

    def __init__(self, data_dir: str | os.PathLike | None = None, seed: int = 0, block_size: int = 64,
                 batch_size: int = 32, samples_per_epoch: int = 8192):
        super().__init__()
        self.root = resolve_data_dir(data_dir)
        self.seed, self.block_size, self.batch_size = int(seed), int(block_size), int(batch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        for key, value in (("batch_size", self.batch_size), ("samples_per_epoch", self.samples_per_epoch),
                           ("block_size", self.block_size)):
            if value < 1:  # samples_per_epoch=0 would train 0 steps and still report a completed run
                raise ConfigError(f"task.datamodule.{key}={value} must be at least 1.")
        self.tokenizer: CharTokenizer | ByteTokenizer | None = None
        self.tokens: dict[str, Tensor] = {}

    def load(self) -> tuple[CharTokenizer | ByteTokenizer, dict[str, Tensor]]:
        """The tokenizer and the (N_s,) token stream of each split in ``SPLITS``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        tokenizer, tokens = self.load()
        for split, stream in tokens.items():
            if len(stream) <= self.block_size:
                raise DataFileError(
                    f"the {split} split of {self.name} has {len(stream)} tokens, too few for one window of "
                    f"block_size={self.block_size}; use a longer text or a smaller block_size."
                )
        self.tokenizer, self.tokens = tokenizer, tokens

    # What the model and the sample writer need -------------------------------------------------

    def _fitted(self) -> CharTokenizer | ByteTokenizer:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the vocabulary is known.")
        return self.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._fitted().vocab_size

    @property
    def char_level(self) -> bool:
        return self._fitted().char_level

    def encode(self, text: str) -> list[int]:
        return self._fitted().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._fitted().decode(ids)

    def model_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size}

    # Loaders -----------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=default_num_workers(),
                          pin_memory=torch.cuda.is_available(), sampler=eval_shard(len(dataset), self))

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.tokens["train"], self.block_size, self.samples_per_epoch, self.seed)
        sampler = ResumableSampler(len(windows), self.seed, shuffle=False, on_epoch=windows.set_epoch)
        return ResumableLoader(windows, sampler, self, batch_size=self.batch_size, num_workers=default_num_workers(),
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._loader(ContiguousWindows(self.tokens["val"], self.block_size))

    def test_dataloader(self) -> DataLoader:
        return self._loader(ContiguousWindows(self.tokens["test"], self.block_size))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class PydocTextDataModule(TextDataModule):
    """CPython's own documentation prose (``pydoc_data.topics``, ~460 kB of English): the offline
    default corpus. Topics are joined in key order; character-level; split by position.

    Args:
        splits: train/val/test fractions of the stream, in that order.
    """

    name = "pydoc_text"

    def __init__(self, splits: Sequence[float] = (0.9, 0.05, 0.05), **kwargs):
        super().__init__(**kwargs)
        self.splits = check_fractions(splits, "task.datamodule.splits")

    def load(self) -> tuple[CharTokenizer, dict[str, Tensor]]:
        text = "\n\n".join(topics[key].strip() for key in sorted(topics))
        tokenizer = CharTokenizer.from_text(text)
        return tokenizer, split_by_position(tokenizer.encode_corpus(text), self.splits)


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# 1,115,394 bytes; the digest TensorFlow Datasets records for this URL (url_checksums/tiny_shakespeare.txt).
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class TinyShakespeareDataModule(TextDataModule):
    """Karpathy's tiny Shakespeare (~1.1 MB), character-level, split by position.

    The file lives at ``<data_dir>/tinyshakespeare/input.txt``; ``prepare_data`` downloads it when
    it is missing and ``download`` is true. Its SHA-256 is checked before every use.

    Args:
        splits: train/val/test fractions of the stream, in that order.
        download: fetch the file from ``url`` when it is missing.
        url: where to fetch it from.
        sha256: expected hex digest; ``None`` skips the check and warns with the file's digest.
    """

    name = "tinyshakespeare"

    def __init__(self, splits: Sequence[float] = (0.9, 0.05, 0.05), download: bool = True,
                 url: str = TINYSHAKESPEARE_URL, sha256: str | None = TINYSHAKESPEARE_SHA256, **kwargs):
        super().__init__(**kwargs)
        self.splits = check_fractions(splits, "task.datamodule.splits")
        self.download, self.url, self.sha256 = download, url, sha256
        self.path = self.root / "tinyshakespeare" / "input.txt"

    def _missing(self) -> DatasetNotFoundError:
        again = "run again with network access" if self.download else "set task.datamodule.download=true"
        return missing_dataset(self.name, self.path.parent, f"save {self.url} as {self.path}, or {again}.")

    def prepare_data(self) -> None:
        if self.path.exists() or not self.download:
            return
        reason = unreachable(self.url)  # offline: one short attempt, not a 60 s urlopen timeout
        if reason is not None:
            raise missing_dataset(self.name, self.path.parent, f"{reason}; save {self.url} as {self.path}, or run "
                                  "again with network access.")
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                data = response.read()
        except OSError as err:  # URLError, timeouts and connection resets are all OSErrors
            raise self._missing() from err
        self._check_digest(data, f"the file downloaded from {self.url}", "it was not saved")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(self.path)

    def _check_digest(self, data: bytes, source: str, remedy: str) -> None:
        """Raise DataFileError when the SHA-256 of ``data`` is not the expected one (warn if none is set)."""
        digest = hashlib.sha256(data).hexdigest()
        if self.sha256 is None:
            warnings.warn(f"{source} has SHA-256 {digest}; task.datamodule.sha256 is null, so it was not checked.",
                          stacklevel=3)
        elif digest != self.sha256.lower():
            raise DataFileError(f"{source} has SHA-256 {digest}, expected {self.sha256}; {remedy}.")

    def load(self) -> tuple[CharTokenizer, dict[str, Tensor]]:
        if not self.path.exists():
            raise self._missing()
        data = read_regular_file(self.path, f"save {self.url} there.")
        self._check_digest(data, str(self.path), "delete it to download it again")
        text = data.decode("utf-8")
        tokenizer = CharTokenizer.from_text(text)
        return tokenizer, split_by_position(tokenizer.encode_corpus(text), self.splits)


class WikiText2DataModule(TextDataModule):
    """WikiText-2 (raw), byte-level (vocabulary 256), with its official train/validation/test splits.

    The splits are read from ``<data_dir>/wikitext2/wikitext-2-raw/wiki.{train,valid,test}.raw`` — the
    layout of the original ``wikitext-2-raw-v1.zip``, so unzipping that into ``<data_dir>/wikitext2``
    works offline. When they are missing and ``download`` is true, ``prepare_data`` fetches the
    dataset from the Hugging Face Hub (cached under ``<data_dir>/wikitext2/hf_cache``) and writes them.

    Args:
        download: fetch the dataset from the Hub when the files are missing.
    """

    name = "wikitext2"
    ZIP_URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"  # holds wikitext-2-raw/wiki.*.raw
    HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
    FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
    HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}

    def __init__(self, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.download = download
        self.dir = self.root / "wikitext2" / "wikitext-2-raw"

    def _present(self) -> bool:
        return all((self.dir / file).exists() for file in self.FILES.values())

    def _missing(self, reason: str = "") -> DatasetNotFoundError:
        again = "run again with network access" if self.download else "set task.datamodule.download=true"
        return missing_dataset(self.name, self.dir, f"{reason}download {self.ZIP_URL} and unzip it into "
                               f"{self.dir.parent} (it holds wikitext-2-raw/wiki.train.raw, ...), or {again}.")

    def _hub_unreachable(self) -> str | None:
        """Why the Hub cannot serve the dataset now (offline mode set, or no connection), or None.
        Checked once, quickly, before ``datasets`` is imported: offline, its client would otherwise
        retry for about 30 s."""
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if os.environ.get(flag, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
                return f"{flag} is set"
        return unreachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")

    def prepare_data(self) -> None:
        if self._present() or not self.download:
            return
        reason = self._hub_unreachable()
        if reason is not None:
            raise self._missing(f"the Hugging Face Hub cannot be reached ({reason}); ")
        import datasets  # imported here: it is slow to import and only needed for this download

        try:
            dataset = datasets.load_dataset(*self.HUB_DATASET, cache_dir=str(self.root / "wikitext2" / "hf_cache"))
        except Exception as err:  # offline, the Hub client raises ConnectionError, OSError, HTTP and hub errors
            raise self._missing() from err
        self.dir.mkdir(parents=True, exist_ok=True)
        for split, file in self.FILES.items():
            # Each row is one line of the original file; blank lines are stored as "".
            lines = dataset[self.HUB_SPLITS[split]]["text"]
            text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
            partial = (self.dir / file).with_suffix(".part")
            partial.write_text(text, encoding="utf-8")
            partial.replace(self.dir / file)

    def load(self) -> tuple[ByteTokenizer, dict[str, Tensor]]:
        if not self._present():
            raise self._missing()
        tokenizer = ByteTokenizer()
        how = f"unzip {self.ZIP_URL} into {self.dir.parent}."
        return tokenizer, {split: tokenizer.encode_corpus(read_regular_file(self.dir / file, how))
                           for split, file in self.FILES.items()}


class TextFileDataModule(TextDataModule):
    """Your own text: a file, a list of files, or a directory (all ``*.txt`` below it, sorted).

    Files are joined in order with a newline between them, tokenized, cut into contiguous chunks
    of about ``chunk_size`` tokens and the chunks dealt to train/val/test by the seed.
    With ``tokenizer: char`` every file must be UTF-8 (otherwise a DataFileError names the file and
    the offending byte); ``tokenizer: byte`` accepts any file.

    Args:
        path: the text file(s) or directory; relative paths are relative to the launch directory.
        tokenizer: ``char`` (vocabulary = the distinct characters) or ``byte`` (vocabulary 256).
        splits: train/val/test fractions of the chunks, in that order.
        chunk_size: tokens per chunk of the seeded split.
    """

    name = "text_file"

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, tokenizer: str = "char",
                 splits: Sequence[float] = (0.9, 0.05, 0.05), chunk_size: int = 2048, **kwargs):
        super().__init__(**kwargs)
        if path is None:
            raise ConfigError("task.path is required for task=text_file: pass task.path=FILE "
                              "(a UTF-8 text file, a list of files, or a directory of .txt files).")
        if tokenizer not in ("char", "byte"):
            raise ConfigError(f"task.tokenizer={tokenizer!r} must be one of 'char', 'byte'.")
        self.paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.tokenizer_kind = tokenizer
        self.splits = check_fractions(splits, "task.datamodule.splits")
        self.chunk_size = int(chunk_size)

    HOW = "pass task.path=FILE (a regular UTF-8 text file, a list of files, or a directory of .txt files)."

    def files(self) -> list[Path]:
        """The files to read, in order; a missing path raises DatasetNotFoundError, and one that is
        neither a regular file nor a directory (a FIFO, a socket, a device) a DataFileError that says
        what it is. Below a directory, only regular ``*.txt`` files are taken."""
        files = []
        for entry in self.paths:
            path = Path(to_absolute_path(str(entry))).expanduser()
            try:
                mode = os.stat(path).st_mode  # stat never opens the path: a FIFO cannot block it
            except FileNotFoundError:
                raise DatasetNotFoundError(f"text file {path} not found; {self.HOW}") from None
            except OSError as err:
                raise DataFileError(f"text path {path} cannot be read ({err.strerror or err}); {self.HOW}") from None
            if stat.S_ISDIR(mode):
                found = sorted(p for p in path.rglob("*.txt") if p.is_file())
                if not found:
                    raise DatasetNotFoundError(f"no .txt files in directory {path}; pass task.path=FILE or a "
                                               "directory containing .txt files.")
                files.extend(found)
            elif stat.S_ISREG(mode):
                files.append(path)
            else:
                raise not_a_text_file(path, mode, self.HOW)
        return files

    def _read(self, path: Path) -> bytes:
        data = read_regular_file(path, self.HOW)
        if not data.strip():
            raise DataFileError(f"text file {path} is empty (or only whitespace).")
        if self.tokenizer_kind == "char":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(f"text file {path} is not valid UTF-8 (byte {err.start}); convert it to UTF-8 "
                                    "or use task.tokenizer=byte.") from None
        return data

    def load(self) -> tuple[CharTokenizer | ByteTokenizer, dict[str, Tensor]]:
        data = b"\n".join(self._read(path) for path in self.files())
        if self.tokenizer_kind == "byte":
            tokenizer: CharTokenizer | ByteTokenizer = ByteTokenizer()
            tokens = tokenizer.encode_corpus(data)
        else:
            text = data.decode("utf-8")
            tokenizer = CharTokenizer.from_text(text)
            tokens = tokenizer.encode_corpus(text)
        return tokenizer, split_by_chunks(tokens, self.splits, self.seed, self.chunk_size)
