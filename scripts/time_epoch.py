"""Estimate how long one training epoch of a task takes on this machine, from a few real steps.

    python scripts/time_epoch.py task=cifar10 device=mzi [Hydra overrides] [--steps 3] [--warmup 1]
        [--train-size N] [--model-kwargs JSON] [--with-digital]

The configuration is composed exactly as ``python train.py`` composes it (same ``conf/``, same
overrides), and the run is built as :func:`astraora.train.run` builds it:

* the task's own DataModule is instantiated from the config, but its data are synthetic: random
  tensors of the real shapes and dtypes are put where the files would be read (``build_splits``
  for classification, ``load`` for language models), so its real ``train_dataloader`` (batch size,
  sampler, ``drop_last``, worker count) and the real per-item transforms run:

  - CIFAR-10 / MNIST: random uint8 images through the real transforms (CIFAR-10: random crop with
    4 px padding + flip, then ToDtype + Normalize), i.e. ``(B, C, H, W)`` float32 standardised;
  - audio tasks: random 1 s waveforms through the DataModule's real ``Frontend`` (mel spectrogram,
    dB, per-clip standardisation, SpecAugment) into ``(B, n_mels, frames)`` log-mels, so the
    feature-extraction cost is measured (audio file decoding is not);
  - language models: a random token stream cut into the real random windows ``(B, T)`` int64;

* the model is ``astraora.build.build_model(cfg, dm.model_kwargs())`` (``--model-kwargs`` adds to or
  replaces those kwargs), wrapped in the task's LightningModule with run()'s optimizer specs;
* a ``lightning.Trainer`` (CPU, no logger, no checkpoints, no validation) runs
  ``warmup + steps`` batches of the module's own ``training_step``; a callback records each
  batch's wall time (``on_train_batch_start`` → ``on_train_batch_end``), the time spent in the
  oracle diagnostics (which ``training_step`` runs every ``callbacks.diagnostics.every_n_steps``
  steps, step 0 included) and in one-time surrogate readouts (the first hybrid forward), and the
  ledger's query counters.

The estimate: ``steps/epoch × (median step + data per batch, when the loader has no workers and so
runs serially) + diagnostic steps per epoch × diagnostics time``. The median is taken over the
timed steps after the warm-up, each with its diagnostics and readout time taken out (both are
reported separately). ``steps/epoch`` is ``train_size // batch_size`` for classification (the real
loader drops the last partial batch) and ``ceil(train_size / batch_size)`` for language models.
Default train sizes: cifar10 45000 (50000 minus the 10 % validation split), mnist 54000,
speechcommands 84843 (the official v2 training list), language models ``samples_per_epoch``.
Validation, test, checkpointing and logging are not timed.

The timings are only as good as the machine is quiet: the report says how many cores other
processes kept busy meanwhile (Linux ``/proc/stat``). On a shared CPU, ``--threads 1`` gives steadier
(single-core) figures; by default torch uses one thread per core, as a real run does.

``--with-digital`` repeats everything with ``device=digital`` and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import Dataset, TensorDataset

from astraora.build import hybrid_layers, instantiate
from astraora.config import validate
from astraora.errors import AstraoraError
from astraora.ledger import PURPOSES
from astraora.train import CONFIG_DIR, build_module, check_group_overrides

#: training examples per epoch when --train-size is not given (language models: samples_per_epoch)
DEFAULT_TRAIN_SIZE = {"cifar10": 45000, "mnist": 54000, "speechcommands": 84843}
#: class counts the DataModule would find on disk
NUM_CLASSES = {"speechcommands": 35, "urbansound8k": 10}
#: character-level vocabulary sizes the DataModule would find on disk
CHAR_VOCAB = {"tinyshakespeare": 65}


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our own options; everything else is a Hydra override."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument (key=value) is a Hydra override, as for train.py.",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training examples per epoch (default: per task, see the module docstring)",
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON added to the DataModule's model kwargs, e.g. '{\"num_classes\": 12}'",
    )
    parser.add_argument(
        "--input-shape",
        type=str,
        default=None,
        help="classification tasks without a synthetic source here: per-example input "
        "shape, e.g. 64 or 3,64,64 (random standard-normal float32 inputs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice, normally one per core)",
    )
    parser.add_argument("--with-digital", action="store_true", help="also time the same run with device=digital")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args, overrides


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config of ``python train.py <overrides>``, validated as run() validates it."""
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------- synthetic data


class TimedDataset(Dataset):
    """Wraps a dataset and records how long each ``__getitem__`` takes (the per-item transforms).

    Only visible in this process, i.e. when the loader has no worker processes."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.item_seconds = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        start = time.perf_counter()
        item = self.dataset[i]
        self.item_seconds.append(time.perf_counter() - start)
        return item

    def batch_seconds(self, batch_size: int) -> float | None:
        """Median item time × batch size (the median ignores first-call set-up costs)."""
        return statistics.median(self.item_seconds) * batch_size if self.item_seconds else None


def synthetic_classification_sets(
    cfg: DictConfig, dm, n_items: int, args: argparse.Namespace, gen: torch.Generator
) -> tuple[TimedDataset, Dataset, Dataset]:
    """Train/val/test datasets of random examples shaped as ``dm``'s real ones (val/test: one batch)."""
    from torchvision.transforms import v2

    from astraora.data.audio import AudioDataModule, AudioTensors
    from astraora.data.vision import CIFAR10DataModule, MNISTDataModule, TensorImages, to_float

    def split(make, n_eval: int):
        return TimedDataset(make(n_items, True)), make(n_eval, False), make(n_eval, False)

    n_eval = dm.batch_size
    if isinstance(dm, CIFAR10DataModule):

        def make(n, train):
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
            steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train and dm.augment else []
            return TensorImages(
                images, torch.randint(0, 10, (n,), generator=gen), v2.Compose([*steps, *to_float(dm.MEAN, dm.STD)])
            )

        return split(make, n_eval)
    if isinstance(dm, MNISTDataModule):

        def make(n, train):
            images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
            return TensorImages(
                images, torch.randint(0, 10, (n,), generator=gen), v2.Compose(to_float(dm.MEAN, dm.STD))
            )

        return split(make, n_eval)
    num_classes = int(
        args.model_kwargs.get("num_classes") or NUM_CLASSES.get(cfg.task.name) or getattr(dm, "num_classes", 0)
    )
    if not num_classes:
        raise SystemExit(
            f"error: say how many classes task={cfg.task.name} has: --model-kwargs '{{\"num_classes\": K}}'."
        )
    if isinstance(dm, AudioDataModule):
        dm.classes = [f"class{k}" for k in range(num_classes)]

        def make(n, train):
            waves = 0.1 * torch.randn(n, dm.frontend.samples, generator=gen)
            return AudioTensors(waves, torch.randint(0, num_classes, (n,), generator=gen), dm.frontend, train=train)

        return split(make, n_eval)
    if args.input_shape is None:
        raise SystemExit(
            f"error: no synthetic source for {type(dm).__name__}; give the per-example input "
            "shape with --input-shape (e.g. 64 or 3,64,64) and --model-kwargs with the model's kwargs."
        )
    shape = tuple(int(s) for s in args.input_shape.split(","))

    def make(n, train):
        return TensorDataset(torch.randn(n, *shape, generator=gen), torch.randint(0, num_classes, (n,), generator=gen))

    return split(make, n_eval)


def synthetic_datamodule(
    cfg: DictConfig, n_batches: int, args: argparse.Namespace
) -> tuple[L.LightningDataModule, TimedDataset | None]:
    """The task's real DataModule with random data in place of the files.

    Returns the DataModule, already ``setup("fit")``, and the timed training set (None for
    language models, whose window slicing is negligible and not timed)."""
    from astraora.data.text import ByteTokenizer, CharTokenizer, TextDataModule
    from astraora.data.vision import ClassificationDataModule

    dm = instantiate(cfg.task.datamodule, _convert_="all")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    timed = None
    if isinstance(dm, TextDataModule):
        vocab = args.model_kwargs.get("vocab_size")
        byte_level = cfg.task.name == "wikitext2" or cfg.task.get("tokenizer") == "byte"
        if byte_level and vocab in (None, 256):
            tokenizer, dtype = ByteTokenizer(), torch.uint8
        else:
            vocab = vocab or CHAR_VOCAB.get(cfg.task.name)
            if not vocab:
                raise SystemExit(
                    f"error: say how large the vocabulary of task={cfg.task.name} is: "
                    "--model-kwargs '{\"vocab_size\": V}'."
                )
            tokenizer, dtype = CharTokenizer("".join(chr(32 + k) for k in range(int(vocab)))), torch.int32
        length = max(4 * dm.block_size, 1_000_000)
        tokens = {
            s: torch.randint(0, tokenizer.vocab_size, (length,), generator=gen).to(dtype)
            for s in ("train", "val", "test")
        }
        dm.load = lambda: (tokenizer, tokens)
    elif isinstance(dm, ClassificationDataModule):
        sets = synthetic_classification_sets(cfg, dm, n_batches * dm.batch_size, args, gen)
        timed = sets[0]
        dm.build_splits = lambda: sets
    else:
        raise SystemExit(f"error: no synthetic source for {type(dm).__name__}.")
    dm.prepare_data = lambda: None  # nothing to download: Trainer.fit would call it
    dm.setup("fit")
    return dm, timed


# ------------------------------------------------------------------------------------- timing


class Stopwatch:
    """Adds up the wall time spent in the functions it wraps."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class OtherLoad:
    """Context manager: how many CPU cores processes other than this one kept busy on average while
    it was open (Linux ``/proc/stat`` minus this process's own CPU time); ``cores`` is None where
    that cannot be read. Anything well above 0 means the timings are slowed by sharing the CPUs."""

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user

    def __enter__(self) -> OtherLoad:
        self.cores = None
        times = os.times()
        self._start = (time.perf_counter(), self._busy_seconds(), times.user + times.system)
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        busy1, times = self._busy_seconds(), os.times()
        wall = time.perf_counter() - wall0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, (busy1 - busy0 - (times.user + times.system - own0)) / wall)


@dataclass
class StepRecord:
    """One training batch: its global step, wall seconds (whole ``training_step``), the seconds of
    it spent in oracle diagnostics and in surrogate readouts, and the ledger queries by purpose."""

    step: int
    wall_s: float
    diagnostics_s: float
    readout_s: float
    queries: dict[str, int]

    @property
    def steady_s(self) -> float:
        """The step without its diagnostics and readout time."""
        return self.wall_s - self.diagnostics_s - self.readout_s

    @property
    def steady_queries(self) -> int:
        return self.queries["total"] - self.queries["readout"]


class StepTimer(L.Callback):
    """Records a :class:`StepRecord` per training batch and prints it to stderr as it ends."""

    def __init__(self, module, label: str):
        self.records: list[StepRecord] = []
        self.label = label
        self.diagnostics, self.readout = Stopwatch(), Stopwatch()
        module.diagnostics = self.diagnostics.wrap(module.diagnostics)  # called by training_step
        for layer in module.physical.values():
            layer.surrogate.readout = self.readout.wrap(layer.surrogate.readout)

    @staticmethod
    def _queries(pl_module) -> dict[str, int]:
        totals = pl_module.query_totals()
        return {p: totals.get(f"queries/{p}", 0) for p in (*PURPOSES, "total")}  # a digital twin has none

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (pl_module.global_step, self.diagnostics.seconds, self.readout.seconds, self._queries(pl_module))
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        wall = time.perf_counter() - self._t0
        step, diag0, read0, q0 = self._start
        q1 = self._queries(pl_module)
        rec = StepRecord(
            step, wall, self.diagnostics.seconds - diag0, self.readout.seconds - read0, {p: q1[p] - q0[p] for p in q1}
        )
        self.records.append(rec)
        extra = (
            f" (diagnostics {rec.diagnostics_s:.2f} s, readout {rec.readout_s:.2f} s)"
            if rec.diagnostics_s + rec.readout_s > 0.005
            else ""
        )
        print(f"  [{self.label}] step {step}: {wall:.2f} s{extra}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    """What one timed configuration produced, and the epoch estimate from it."""

    task: str
    device: str
    mode: str
    batch_size: int
    physical: list[str]
    warmup: int
    records: list[StepRecord]
    steps_per_epoch: int
    train_size: int
    drop_last: bool
    data_s: float | None  # per batch: median item time × batch size (None: not measured)
    data_serial: bool  # the loader has no workers: data time adds to the step time
    data_what: str
    diagnostics_every: int
    setup_s: float
    others_cores: float | None  # CPU cores other processes kept busy meanwhile (None: unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def timed(self) -> list[StepRecord]:
        return self.records[self.warmup :]

    @property
    def step_s(self) -> float:
        return statistics.median(r.steady_s for r in self.timed)

    @property
    def diagnostics_s(self) -> float:
        """Diagnostics time of one diagnostic step (median over those seen, warm-up included)."""
        seen = (
            [r.diagnostics_s for r in self.records if r.step % self.diagnostics_every == 0]
            if self.diagnostics_every
            else []
        )
        return statistics.median(seen) if seen else 0.0

    @property
    def diagnostic_steps(self) -> int:
        """Diagnostic steps in the first epoch (global steps 0, every, 2·every, ...)."""
        return math.ceil(self.steps_per_epoch / self.diagnostics_every) if self.diagnostics_every else 0

    @property
    def readout_s(self) -> float:
        return sum(r.readout_s for r in self.records)

    @property
    def queries_per_step(self) -> int:
        return int(statistics.median(r.steady_queries for r in self.timed))

    @property
    def epoch_s(self) -> float:
        per_step = self.step_s + (self.data_s if self.data_serial and self.data_s else 0.0)
        return self.steps_per_epoch * per_step + self.diagnostic_steps * self.diagnostics_s


def train_size_for(cfg: DictConfig, args: argparse.Namespace) -> int:
    if args.train_size:
        return int(args.train_size)
    if cfg.task.kind == "language_model":
        return int(cfg.task.datamodule.samples_per_epoch)
    if cfg.task.name in DEFAULT_TRAIN_SIZE:
        return DEFAULT_TRAIN_SIZE[cfg.task.name]
    raise SystemExit(f"error: no default training-set size for task={cfg.task.name}; pass --train-size N.")


def time_training(cfg: DictConfig, args: argparse.Namespace) -> Timing:
    """Build the run of ``cfg`` on synthetic data and time ``args.warmup + args.steps`` training steps."""
    started = time.perf_counter()
    train_size = train_size_for(cfg, args)  # before the slow part: a missing size fails at once
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    n_steps = args.warmup + args.steps
    dm, timed_set = synthetic_datamodule(cfg, n_steps + 1, args)
    model_kwargs = {**dm.model_kwargs(), **args.model_kwargs}
    module = build_module(cfg, dm, model_kwargs)
    model = module.model
    layers = hybrid_layers(model)
    device_label = cfg.device.family
    timer = StepTimer(module, f"{cfg.task.name}/{device_label}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=n_steps,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    setup_s = time.perf_counter() - started
    with OtherLoad() as others:
        trainer.fit(module, datamodule=dm)
    if len(timer.records) < n_steps:
        raise SystemExit(f"error: only {len(timer.records)} of {n_steps} steps ran.")

    drop_last = cfg.task.kind == "classification"
    steps_per_epoch = train_size // dm.batch_size if drop_last else math.ceil(train_size / dm.batch_size)
    num_workers = getattr(dm, "num_workers", 0)
    data_s, data_what = None, "token windows (slicing a tensor; not timed)"
    if timed_set is not None:
        data_what = {
            "AudioTensors": "log-mel Frontend per clip (waveform decoding not timed)",
            "TensorImages": "image transforms per item",
        }.get(type(timed_set.dataset).__name__, "random tensors")
        if num_workers == 0:
            data_s = timed_set.batch_seconds(dm.batch_size)
    notes = []
    if timed_set is not None and num_workers > 0:
        notes.append(f"the loader has {num_workers} workers: data loading overlaps the step and is not timed")
    return Timing(
        task=cfg.task.name,
        device=device_label,
        mode=cfg.mode if layers else "digital",
        batch_size=dm.batch_size,
        physical=[
            f"{name}: {layer.d_in} → {layer.d_out} ({type(layer.device).__name__})" for name, layer in layers.items()
        ],
        warmup=args.warmup,
        records=timer.records,
        steps_per_epoch=steps_per_epoch,
        train_size=train_size,
        drop_last=drop_last,
        data_s=data_s,
        data_serial=num_workers == 0,
        data_what=data_what,
        diagnostics_every=int(cfg.callbacks.diagnostics.every_n_steps),
        setup_s=setup_s,
        others_cores=others.cores,
        notes=notes,
    )


# ------------------------------------------------------------------------------------- report


def hours(seconds: float) -> str:
    return f"{seconds:,.0f} s = {seconds / 3600:.2f} h"


def format_report(t: Timing) -> str:
    """The figures of one timed configuration, one per line."""
    timed = t.timed
    walls = [r.steady_s for r in timed]
    lines = [
        f"task             {t.task}",
        f"device           {t.device}",
        f"mode             {t.mode}",
        f"batch size       {t.batch_size}",
    ]
    if t.physical:
        lines.append(f"physical layers  {'; '.join(t.physical)}")
    lines += [
        f"torch threads    {torch.get_num_threads()} of {os.cpu_count()} CPUs"
        + (f"; other processes kept {t.others_cores:.1f} cores busy meanwhile" if t.others_cores is not None else ""),
        f"timed steps      {len(timed)} after {t.warmup} warm-up "
        f"(steady times {', '.join(f'{w:.2f}' for w in walls)} s)",
        f"seconds/step     {t.step_s:.3f} (median; model step = forward + backward + optimizers + surrogate update)",
    ]
    if t.data_s is not None:
        lines.append(
            f"data/batch       {t.data_s:.3f} s ({t.data_what}; {'serial, added' if t.data_serial else 'overlapped'})"
        )
    else:
        lines.append(f"data/batch       not timed ({t.data_what})")
    if t.diagnostic_steps:
        lines.append(
            f"diagnostics      {t.diagnostics_s:.2f} s per diagnostic step, every {t.diagnostics_every} steps "
            f"({t.diagnostic_steps} per epoch)"
        )
    if t.readout_s > 0:
        lines.append(f"readout          {t.readout_s:.2f} s once per run (first forward; not in the epoch estimate)")
    how = "//" if t.drop_last else "ceil /"
    lines += [
        f"steps/epoch      {t.steps_per_epoch} (train size {t.train_size} {how} batch {t.batch_size})",
        f"epoch estimate   {hours(t.epoch_s)}",
        f"queries/step     {t.queries_per_step:,} (ledger, readout excluded; last step by purpose: "
        + ", ".join(f"{p} {timed[-1].queries[p]:,}" for p in PURPOSES)
        + ")",
        f"setup            {t.setup_s:.1f} s (build data + model, not in the estimate)",
    ]
    lines += [f"note             {n}" for n in t.notes]
    return "\n".join(lines)


def digital_overrides(overrides: list[str]) -> list[str]:
    """The same overrides with the device group replaced by ``digital``."""
    return [o for o in overrides if o.lstrip("+~").partition("=")[0] != "device"] + ["device=digital"]


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    runs = [overrides] + ([digital_overrides(overrides)] if args.with_digital else [])
    results = []
    try:
        for ov in runs:
            cfg = compose_config(ov)
            timing = time_training(cfg, args)
            print(format_report(timing), flush=True)
            print(flush=True)
            results.append(timing)
    except AstraoraError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if len(results) == 2 and results[1].epoch_s > 0:
        hybrid, digital = results
        print(
            f"hybrid / digital: {hybrid.epoch_s / digital.epoch_s:.1f}x per epoch "
            f"({hours(hybrid.epoch_s)} vs {hours(digital.epoch_s)})"
        )


if __name__ == "__main__":
    main()
