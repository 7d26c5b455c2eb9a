"""Audio classification DataModules: Speech Commands v2, UrbanSound8K, any local audio folder and a
synthetic source for tests and offline smoke runs.

Audio is decoded with soundfile, downmixed to mono, resampled to ``sample_rate`` and padded or
cropped to ``duration`` seconds; items are standardised log-mel spectrograms. Every batch is
``(x, y)``: ``x`` float32 ``(B, n_mels, frames)`` with ``frames = samples // hop + 1`` (10 ms hop),
``y`` int64 class indices ``(B,)``. Training items get a random crop and SpecAugment-style masks,
drawn from torch's global generator, which the training loader seeds per item from
``(seed, epoch, index)`` (:class:`astraora.data.common.SeededItems`): the same with any number of
workers, under DDP and after a mid-epoch resume.
"""

from __future__ import annotations

import csv
import functools
import math
from fractions import Fraction
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.transforms as T
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from astraora.data.common import missing_dataset, seeded_split
from astraora.data.vision import (ClassificationDataModule, Item, class_files, fetch, locate_root, split_class_tree,
                                  three_way_fractions, warn_skipped)
from astraora.errors import DataFileError
from astraora.rng import make_generator

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


# ------------------------------------------------------------------------------- decoding, features

# The largest term of the reduced rate ratio a resampling kernel is built for. torchaudio's
# Resample(orig, new) builds a kernel of (new/g) × (orig/g + 2·⌈6·orig/min(orig, new)⌉) taps, g = gcd:
# for 44100 → 16000 (441:160) 160 × 475, but for 8009 → 16000 (gcd 1) 16000 × 8023 (0.5 GB, and about
# 4 GB while it is built), and 44101 → 16000 would need about 25 GB. With both terms ≤ 1000 a kernel
# has at most about a million taps (4 MB).
MAX_RATIO_TERM = 1000


def resampling_rates(orig_rate: int, new_rate: int, limit: int = MAX_RATIO_TERM) -> tuple[int, int]:
    """The ``(orig, new)`` pair a resampling kernel is built for, at a bounded cost for any rates.

    When ``orig_rate : new_rate`` reduced by their gcd has both terms ≤ ``limit`` (every common rate:
    8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400 or 192000 Hz, to
    8000, 16000, 24000, 44100 or 48000 Hz), the rates themselves: the output is exactly torchaudio's
    ``Resample(orig_rate, new_rate)``. Otherwise the closest fraction ``p/q ≈ new_rate/orig_rate``
    with p, q ≤ ``limit`` (``Fraction.limit_denominator`` on the ratio or its inverse, whichever is
    ≤ 1): the audio is resampled by ``p/q`` instead of the exact ratio, so its pitch and tempo are off
    by the relative error ``|p/q ÷ (new/orig) − 1|``: 0.00001 % for 8009 → 16000 (445:889), 0.0004 %
    for 44101 → 16000 (328:119), and at most 0.05 % (under 1 cent; the smallest audible pitch change is about 5 cents)
    for any source rate from 4 kHz to 200 kHz to 8, 16, 22.05, 44.1 or 48 kHz.
    """
    g = math.gcd(orig_rate, new_rate)
    if max(orig_rate, new_rate) // g <= limit:
        return orig_rate, new_rate
    ratio = Fraction(new_rate, orig_rate)
    if ratio <= 1:
        approx = ratio.limit_denominator(limit)
        approx = approx if approx else Fraction(1, limit)
    else:
        inverse = (1 / ratio).limit_denominator(limit)
        approx = 1 / (inverse if inverse else Fraction(1, limit))
    return approx.denominator, approx.numerator


@functools.lru_cache(maxsize=16)
def resampler(orig_rate: int, new_rate: int) -> T.Resample:
    """A cached resampling kernel per rate pair, of bounded size (see :func:`resampling_rates`)."""
    return T.Resample(*resampling_rates(int(orig_rate), int(new_rate)))


def read_audio(path: Path, sample_rate: int) -> Tensor:
    """Decode an audio file, downmix to mono and resample: ``(samples,)`` float32 at ``sample_rate``."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as exc:  # noqa: BLE001 - libsndfile errors, truncated files
        raise DataFileError(f"{path} is unreadable audio ({type(exc).__name__}: {exc}).") from None
    wave = torch.from_numpy(data).mean(dim=1)
    return wave if rate == sample_rate else resampler(rate, sample_rate)(wave)


def audio_is_readable(path: Path) -> bool:
    """Cheap check at setup: soundfile parses the header and finds at least one sample."""
    try:
        return sf.info(str(path)).frames > 0
    except Exception:  # noqa: BLE001
        return False


class Frontend(nn.Module):
    """Waveform ``(any samples,)`` → standardised log-mel ``(n_mels, frames)``.

    Pads with zeros or crops to ``duration`` seconds (centred; a random offset in training), then a
    mel power spectrogram with 25 ms windows and a 10 ms hop, in dB (80 dB range), standardised per
    clip. In training, SpecAugment masks one band of up to ``freq_mask`` mel bins and one span of up
    to ``time_mask`` frames (0 disables either).
    """

    def __init__(self, sample_rate: int = 16000, duration: float = 1.0, n_mels: int = 80,
                 freq_mask: int = 0, time_mask: int = 0):
        super().__init__()
        self.sample_rate, self.n_mels = int(sample_rate), int(n_mels)
        self.samples = round(duration * sample_rate)
        window, hop = round(0.025 * sample_rate), round(0.010 * sample_rate)
        self.mel = T.MelSpectrogram(sample_rate, n_fft=2 ** math.ceil(math.log2(window)), win_length=window,
                                    hop_length=hop, f_min=20.0, n_mels=n_mels)
        self.to_db = T.AmplitudeToDB("power", top_db=80.0)
        self.augment = nn.Sequential(T.FrequencyMasking(freq_mask), T.TimeMasking(time_mask))

    def fit_length(self, wave: Tensor, train: bool) -> Tensor:
        """``(any samples,) → (samples,)``: zero-padded at the end or cropped."""
        excess = wave.numel() - self.samples
        if excess <= 0:
            return F.pad(wave, (0, -excess))
        start = int(torch.randint(excess + 1, ())) if train else excess // 2
        return wave[start:start + self.samples]

    def forward(self, wave: Tensor, train: bool = False) -> Tensor:
        x = self.to_db(self.mel(self.fit_length(wave, train)))
        x = (x - x.mean()) / (x.std() + 1e-5)
        return self.augment(x) if train else x  # masked cells become 0, the clip mean


class Clips(Dataset):
    """Labelled clips → ``(frontend(waveform) (n_mels, frames), label)``; subclasses give ``waveform(i)``."""

    def __init__(self, labels: list[int], frontend: Frontend, train: bool):
        self.labels, self.frontend, self.train = labels, frontend, train

    def waveform(self, i: int) -> Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with torch.no_grad():
            return self.frontend(self.waveform(i), self.train), self.labels[i]


class AudioFiles(Clips):
    """Clips decoded from files on each access (``items``: ``(file, label)``)."""

    def __init__(self, items: list[Item], frontend: Frontend, train: bool):
        super().__init__([label for _, label in items], frontend, train)
        self.paths = [path for path, _ in items]

    def waveform(self, i: int) -> Tensor:
        return read_audio(self.paths[i], self.frontend.sample_rate)


class AudioTensors(Clips):
    """Clips held in memory: ``waves (N, samples)``, ``labels (N,)``."""

    def __init__(self, waves: Tensor, labels: Tensor, frontend: Frontend, train: bool):
        super().__init__(labels.tolist(), frontend, train)
        self.waves = waves

    def waveform(self, i: int) -> Tensor:
        return self.waves[i]


class AudioDataModule(ClassificationDataModule):
    """The audio knobs every source shares: ``sample_rate`` (Hz), ``duration`` (s), ``n_mels`` and the
    SpecAugment widths ``freq_mask`` (mel bins) and ``time_mask`` (frames). Subclasses set
    ``self.classes`` in ``build_splits``. Training items' random crop and masks are drawn per item
    from ``(seed, epoch, index)`` (see :class:`ClassificationDataModule`)."""

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 64, num_workers: int | None = None,
                 sample_rate: int = 16000, duration: float = 1.0, n_mels: int = 80, freq_mask: int = 0,
                 time_mask: int = 0):
        super().__init__(data_dir, seed, batch_size, num_workers)
        self.frontend = Frontend(sample_rate, duration, n_mels, freq_mask, time_mask)
        self.classes: list[str] = []

    def file_sets(self, splits: dict[str, list[Item]]) -> tuple[AudioFiles, AudioFiles, AudioFiles]:
        return tuple(AudioFiles(splits[s], self.frontend, train=s == "train") for s in ("train", "val", "test"))

    def model_kwargs(self) -> dict:
        return {"num_classes": len(self.classes), "n_mels": self.frontend.n_mels}


# ------------------------------------------------------------------------------ Speech Commands v2

class SpeechCommandsDataModule(AudioDataModule):
    """Speech Commands v2: 35 spoken words, 1 s clips at 16 kHz, split by the official
    ``validation_list.txt`` and ``testing_list.txt`` (the rest is train; ``_background_noise_`` unused).

    Looked for in ``data_dir/SpeechCommands/speech_commands_v0.02`` (torchaudio's layout) and
    downloaded there through torchaudio (2.3 GB, sha256-checked) when missing and ``download``.
    """

    name = "speechcommands"
    URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 128, sample_rate: int = 16000,
                 duration: float = 1.0, n_mels: int = 80, freq_mask: int = 15, time_mask: int = 20,
                 download: bool = True, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers, sample_rate, duration, n_mels, freq_mask, time_mask)
        self.download = bool(download)
        self.folder = self.data_dir / "SpeechCommands" / "speech_commands_v0.02"

    def _present(self) -> bool:
        return all((self.folder / name).is_file() for name in ("validation_list.txt", "testing_list.txt"))

    def _fetch(self, download: bool) -> None:
        from torchaudio.datasets import SPEECHCOMMANDS

        fetch("speechcommands", self._present,
              (lambda: SPEECHCOMMANDS(self.data_dir, download=True)) if download else None,
              self.folder, f"download {self.URL} and extract it into that directory", self.URL)

    def prepare_data(self) -> None:
        self._fetch(self.download)

    def split_source(self, split: str) -> str:
        listed = {"val": " (the files validation_list.txt names)", "test": " (the files testing_list.txt names)"}
        return f"of {self.folder}{listed.get(split, '')}"

    def needs_split(self, split: str) -> bool:
        return True  # the official lists name thousands of files for each

    def build_splits(self):
        self._fetch(download=False)
        self.classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("_"))
        skipped: list[Path] = []
        items = class_files(self.folder, self.classes, (".wav",), audio_is_readable, skipped)
        warn_skipped("speechcommands", skipped)
        listed = {split: set((self.folder / f"{split}_list.txt").read_text().split())
                  for split in ("validation", "testing")}
        splits = {"train": [], "val": [], "test": []}
        for path, label in items:
            name = path.relative_to(self.folder).as_posix()
            split = "val" if name in listed["validation"] else "test" if name in listed["testing"] else "train"
            splits[split].append((path, label))
        return self.file_sets(splits)


# ----------------------------------------------------------------------------------- UrbanSound8K

class UrbanSound8KDataModule(AudioDataModule):
    """UrbanSound8K: 8732 urban sound clips (≤ 4 s, 10 classes), read where the user keeps it:
    ``task.root`` or else ``data_dir/UrbanSound8K``, laid out as released (``audio/fold1..fold10/*.wav``
    and ``metadata/UrbanSound8K.csv``). Folds 1–8 train, 9 validation, 10 test by default.
    """

    name = "urbansound8k"
    COLUMNS = ("slice_file_name", "fold", "classID", "class")
    HOW = ("download it from https://urbansounddataset.weebly.com/urbansound8k.html and extract it so that "
           "DIR/metadata/UrbanSound8K.csv and DIR/audio/fold1..fold10 exist, then set task.root=DIR "
           "or put it at paths.data_dir/UrbanSound8K.")

    def __init__(self, root=None, data_dir=None, seed: int = 0, batch_size: int = 32, sample_rate: int = 16000,
                 duration: float = 4.0, n_mels: int = 80, freq_mask: int = 15, time_mask: int = 40,
                 train_folds=(1, 2, 3, 4, 5, 6, 7, 8), val_folds=(9,), test_folds=(10,),
                 num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers, sample_rate, duration, n_mels, freq_mask, time_mask)
        self.root = (self.data_dir / "UrbanSound8K" if root is None
                     else locate_root(root, self.data_dir, "task.root", "DIR/audio/fold<k>/"))
        self.folds = {"train": set(train_folds), "val": set(val_folds), "test": set(test_folds)}

    def split_source(self, split: str) -> str:
        return (f"of {self.root} (readable clips of folds {sorted(self.folds[split])}, "
                f"task.datamodule.{split}_folds)")

    def needs_split(self, split: str) -> bool:
        return bool(self.folds[split])  # an empty list of folds leaves the split out on purpose

    def _rows(self) -> list[dict]:
        table = self.root / "metadata" / "UrbanSound8K.csv"
        if not table.is_file() or not (self.root / "audio").is_dir():
            raise missing_dataset("urbansound8k", self.root, self.HOW)
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in self.COLUMNS if rows and c not in rows[0]]
        if not rows or missing:
            raise DataFileError(f"{table} has no rows or lacks the columns {missing}.")
        return rows

    def build_splits(self):
        rows = self._rows()
        names = {int(r["classID"]): r["class"] for r in rows}
        self.classes = [names[k] for k in sorted(names)]
        splits, skipped = {"train": [], "val": [], "test": []}, []
        for row in rows:
            path = self.root / "audio" / f"fold{row['fold']}" / row["slice_file_name"]
            split = next((s for s, folds in self.folds.items() if int(row["fold"]) in folds), None)
            if split is None:
                continue
            if audio_is_readable(path):
                splits[split].append((path, int(row["classID"])))
            else:
                skipped.append(path)
        warn_skipped("urbansound8k", skipped)
        return self.file_sets(splits)


# ------------------------------------------------------------------------------- local audio folder

class AudioFolderDataModule(AudioDataModule):
    """Any ``root/<class>/<file>.wav|flac|ogg`` tree, given by ``task.root``; splits as in
    :func:`astraora.data.vision.split_class_tree` (``train/``, ``val/``, ``test/`` subfolders or a
    seeded split). Files at other rates are resampled; stereo is downmixed."""

    name = "audio_folder"

    def __init__(self, root=None, data_dir=None, seed: int = 0, batch_size: int = 64, sample_rate: int = 16000,
                 duration: float = 1.0, n_mels: int = 80, freq_mask: int = 15, time_mask: int = 20,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, num_workers: int | None = None):
        super().__init__(data_dir, seed, batch_size, num_workers, sample_rate, duration, n_mels, freq_mask, time_mask)
        self.root = root
        self.fractions = three_way_fractions(val_fraction, test_fraction)[1:]

    def split_source(self, split: str) -> str:
        return f"of {self.root} (task.root)"

    def build_splits(self):
        root = locate_root(self.root, self.data_dir, "task.root", "DIR/<class>/<file>.wav")
        self.classes, splits = split_class_tree(root, AUDIO_EXTENSIONS, audio_is_readable, self.seed,
                                                *self.fractions, "audio_folder")
        return self.file_sets(splits)


# ------------------------------------------------------------------------------- synthetic source

def synthetic_clips(num_classes: int, clips_per_class: int, samples: int, sample_rate: int, noise: float,
                    gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class-conditional chirps in white noise: waves ``(N, samples)``, labels ``(N,)``, N = K·clips.

    Class k starts at f_k = 200 Hz · 8^(k/K) (three octaves over the classes, ±3 % jitter) and rises
    by half of it over the clip; amplitude in [0.3, 1], random phase, noise std ``noise``.
    """
    labels = torch.arange(num_classes).repeat_interleave(clips_per_class)
    n = len(labels)
    t = torch.arange(samples) / sample_rate  # (samples,) seconds
    span = samples / sample_rate
    f0 = 200.0 * 8.0 ** (labels / num_classes) * (1 + 0.03 * (2 * torch.rand(n, generator=gen) - 1))
    phase = 2 * math.pi * f0[:, None] * (t + 0.25 * t**2 / span) + 2 * math.pi * torch.rand(n, 1, generator=gen)
    amplitude = 0.3 + 0.7 * torch.rand(n, 1, generator=gen)
    waves = amplitude * torch.sin(phase) + noise * torch.randn(n, samples, generator=gen)
    return waves.float(), labels


class SyntheticAudioDataModule(AudioDataModule):
    """SYNTHETIC audio for tests and offline smoke runs only: ``num_classes`` classes of chirps in
    noise (see :func:`synthetic_clips`), generated in memory from ``seed`` and split 70/15/15 by default.
    Not a benchmark; it says nothing about real audio."""

    name = "synthetic_audio"

    def split_source(self, split: str) -> str:
        return (f"(task.datamodule.num_classes={self.num_classes}, clips_per_class={self.clips_per_class}, "
                f"val_fraction={self.fractions[1]}, test_fraction={self.fractions[2]})")

    def needs_split(self, split: str) -> bool:
        return self.fractions[1 if split == "val" else 2] > 0

    def __init__(self, data_dir=None, seed: int = 0, batch_size: int = 32, num_classes: int = 4,
                 clips_per_class: int = 64, noise: float = 0.3, sample_rate: int = 8000, duration: float = 0.5,
                 n_mels: int = 32, freq_mask: int = 4, time_mask: int = 5, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, num_workers: int | None = 0):
        super().__init__(data_dir, seed, batch_size, num_workers, sample_rate, duration, n_mels, freq_mask, time_mask)
        self.num_classes, self.clips_per_class, self.noise = int(num_classes), int(clips_per_class), float(noise)
        self.fractions = three_way_fractions(val_fraction, test_fraction)

    def build_splits(self):
        self.classes = [f"class{k}" for k in range(self.num_classes)]
        gen = make_generator(self.seed, "synthetic_audio")
        waves, labels = synthetic_clips(self.num_classes, self.clips_per_class, self.frontend.samples,
                                        self.frontend.sample_rate, self.noise, gen)
        train, val, test = seeded_split(len(labels), self.fractions, self.seed)
        return (AudioTensors(waves[train], labels[train], self.frontend, train=True),
                AudioTensors(waves[val], labels[val], self.frontend, train=False),
                AudioTensors(waves[test], labels[test], self.frontend, train=False))
