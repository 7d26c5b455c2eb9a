"""Checks that need torch, made by :func:`astraora.train.run` before a run allocates its model.

* :func:`check_trainer`: the accelerator is there (``trainer=gpu`` without a CUDA GPU, ``mps``
  without MPS), and Lightning accepts the trainer settings (its own refusals become one line).
* :func:`check_memory`: what the run will need, estimated from the config without allocating the
  model, against the memory available (RAM, or the GPU's free memory). A width that needs tens of
  GB is refused in one line naming its key instead of growing the process until it is killed.

The estimate (:func:`estimate_memory`) builds the model with every tensor of ``LARGE_TENSOR`` or more
elements on torch's ``meta`` device (shapes and dtypes, no memory), so parameters and buffers are
counted exactly, whatever the device family; small tensors stay real so that code reading a few
values while it builds (an index table, a calibration constant) still runs. To that it adds what
training holds besides the model (gradients, the optimizers' moments) and the largest working set
of one physical layer's step: the ZO estimate's θ-sized buffers and readings, the surrogate's
readout and SVD, and the simulator's autograd graph where it is used (``exact`` modes, and the
oracle diagnostics, ``callbacks.diagnostics.every_n_steps > 0``), traced on meta tensors. Digital
activations are not counted: the estimate is a floor, refused only when even that does not fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten, tree_map

from astraora.errors import AstraoraError, ConfigError

log = logging.getLogger("astraora")

LARGE_TENSOR = 1 << 16  # elements: tensors this big are made on the meta device while estimating
SAFE_FRACTION = 0.9  # a run whose estimate exceeds this share of the available memory is refused
GB = 1e9
# moments each optimizer keeps per parameter (sgd: momentum, on by default in astraora.build)
OPTIMIZER_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 1}


# ----------------------------------------------------------------------------------------- trainer
def check_trainer(cfg: DictConfig) -> None:
    """Refuse an accelerator this machine does not have, then any trainer setting Lightning refuses,
    in one line (a :class:`ConfigError`), before data or model are built."""
    check_accelerator(cfg)
    _probe_trainer(cfg)


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator`` names hardware this machine has (and ``trainer.devices`` no more GPUs
    than it has). The command line calls it for jobs that train on this machine."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}); use trainer=cpu, or run where a GPU is."
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: torch sees no Apple MPS device on this machine; use trainer=cpu.")
    if accelerator == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError(
                "trainer.accelerator=tpu needs torch_xla, which is not installed; use trainer=cpu or trainer=gpu."
            )
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={devices} is not allowed: torch sees {torch.cuda.device_count()} CUDA "
            f"GPU(s) here; give at most that many, or -1 (all of them)."
        )


def _probe_trainer(cfg: DictConfig) -> None:
    """Construct (and drop) a Lightning Trainer with the configured settings: it checks them all
    (a keyword it does not know, a combination such as precision=16-mixed on a CPU) without
    starting anything or writing a file. Its own log lines are kept off the console."""
    import lightning as L

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(**kwargs, logger=False, callbacks=[], enable_checkpointing=False)
    except Exception as err:  # noqa: BLE001 - whatever Lightning raises, the user gets one line
        message = " ".join(str(err).split()) or type(err).__name__
        named = [key for key in kwargs if key in message]
        where = f"trainer.{max(named, key=len)}={kwargs[max(named, key=len)]!r}" if named else "the trainer settings"
        raise ConfigError(f"{where} refused by Lightning: {message}") from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ----------------------------------------------------------------------------------------- memory
class LargeTensorsOnMeta(TorchFunctionMode):
    """Inside this mode a tensor of :data:`LARGE_TENSOR` elements or more is made on the meta device
    (no memory) and every operation touching a meta tensor gives a meta tensor; smaller results
    stay real. Each operation on real tensors is first tried on meta copies to learn the size of
    its result; one whose size depends on values (``repeat_interleave``) gets that size from its
    (small, real) arguments."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _has_meta((args, kwargs)):
            return func(*_on_meta(args), **_on_meta(kwargs))
        trial = self._try_on_meta(func, args, kwargs)
        if trial is not None and _numel(trial) >= LARGE_TENSOR:
            return trial
        return func(*args, **kwargs)

    @staticmethod
    def _try_on_meta(func, args, kwargs):
        kwargs = dict(kwargs)
        if func in _device_constructors() and kwargs.get("device") in (None, "cpu", torch.device("cpu")):
            kwargs["device"] = "meta"
        if getattr(func, "__name__", "") == "repeat_interleave" and "output_size" not in kwargs:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and repeats.dim() == 1 and repeats.numel() > 1:
                kwargs["output_size"] = int(repeats.sum())
        try:
            return func(*_on_meta(args), **_on_meta(kwargs))
        except Exception:  # noqa: BLE001 - reads values (.item()) or is data-dependent: run it for real
            return None


def _has_meta(tree) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten(tree)[0])


def _on_meta(tree):
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta else t, tree)


def _numel(result) -> int:
    return sum(t.numel() for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class MemoryEstimate:
    """What a run needs, in bytes, by part; ``layer`` describes the largest physical layer."""

    parts: dict[str, int] = field(default_factory=dict)
    layer: str | None = None
    layer_shape: tuple[int, int] | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _rows(cfg: DictConfig) -> int:
    """Rows a physical layer sees per step: the batch, times the sequence for language models."""
    batch = int(OmegaConf.select(cfg, "task.datamodule.batch_size", default=1) or 1)
    if cfg.task.kind == "language_model":
        batch *= int(OmegaConf.select(cfg, "task.model.block_size", default=1) or 1)
    return batch


def _trace_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs (on meta tensors), plus its output."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        saved[id(base)] = _nbytes(base)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()) + _nbytes(out)


def _layer_step_bytes(cfg: DictConfig, layer, rows: int, diagnostics: bool, where: str, trace: bool) -> dict[str, int]:
    """The working memory of one step of a physical layer, by part. ``trace``: also trace the
    simulator's autograd graph (on meta tensors; seconds for a mesh of thousands of wires)."""
    from astraora.zo import ZOEstimator

    device, n, m = layer.device, layer.d_in, layer.d_out
    p, size = layer.theta.numel(), layer.theta.element_size()
    mode, out = str(cfg.mode), {}
    if mode.startswith("zo") and isinstance(layer.zo, ZOEstimator):
        q = m if rows > m else rows  # the estimator's probes: GᵀX when the batch is wider than the layer
        chunk = layer.zo.chunk_for(p, q, n, m, where)
        # ĝ, the directions and settings (chunk × p each), the effective settings and the readings
        out["zo"] = size * (2 * p + 3 * chunk * p + 2 * chunk * q * m)
    elif mode.startswith("zo"):  # colored differences read the matrix out
        out["zo"] = size * (2 * p + n * n + 2 * m * n)
    k = min(n, m)
    readout = size * (n * n + 2 * m * n + (m + n) * k + 4 * k * k)  # identity, readings, SVD and its work
    if mode.endswith("+sm"):
        out["readout"] = readout
    if trace and getattr(device, "has_simulator", False) and (mode != "zo+sm" or diagnostics):

        def simulate():
            meta = device.to("meta")  # the estimate's own model: nothing else uses it
            theta = meta.theta.detach().requires_grad_(True)
            return meta.simulate(torch.empty(rows, n, dtype=theta.dtype, device="meta"), theta)

        try:
            graph = _trace_bytes(simulate)
        except Exception:  # noqa: BLE001 - a simulator meta tensors cannot run: not counted
            graph = 0
        # the oracle's matrix (and its SVD in float64) besides the graph
        out["simulator autograd"] = graph + (readout + 2 * size * m * n if diagnostics else 0)
    return out


def estimate_memory(
    cfg: DictConfig, model_kwargs: dict, where: str = "cpu", limit: float | None = None
) -> MemoryEstimate | None:
    """The run's memory from its config (see the module's docstring), without allocating the model;
    None where the model cannot be built on meta tensors (the check is then left out). With
    ``limit`` (bytes), the simulator's autograd graph is traced only where the rest fits in it."""
    from astraora.build import build_model, hybrid_layers, instantiate

    remote = cfg.device.family == "remote"  # its chip is elsewhere; only the digital part is here
    try:
        with LargeTensorsOnMeta():
            if remote:
                model = instantiate(
                    cfg.task.model, layer_factory=lambda d_in, d_out, name: nn.Linear(d_in, d_out), **model_kwargs
                )
            else:
                model = build_model(cfg, model_kwargs)
    except AstraoraError:
        raise
    except Exception as err:  # noqa: BLE001 - never block a run because it cannot be estimated
        log.debug("memory preflight left out: the model does not build on meta tensors (%s)", err)
        return None
    layers = {} if remote else hybrid_layers(model)
    thetas = {id(layer.theta) for layer in layers.values()}
    physical = {id(p) for layer in layers.values() for p in (layer.theta, layer.scale) if p is not None}
    params = list(model.parameters())
    estimate = MemoryEstimate()
    estimate.parts["parameters and buffers"] = sum(_nbytes(t) for t in [*params, *model.buffers()])
    estimate.parts["gradients"] = sum(_nbytes(t) for t in params if t.requires_grad)
    moments = lambda spec, ps: OPTIMIZER_MOMENTS.get(str(spec.name), 2) * sum(_nbytes(t) for t in ps)  # noqa: E731
    estimate.parts["optimizer state"] = moments(
        cfg.task.optimizer, [t for t in params if id(t) not in physical]
    ) + moments(cfg.physical_optimizer, [t for t in params if id(t) in physical])
    estimate.parts["θ copy on logging steps"] = sum(_nbytes(t) for t in params if id(t) in thetas)
    diagnostics = int(OmegaConf.select(cfg, "callbacks.diagnostics.every_n_steps", default=0) or 0) > 0
    rows = _rows(cfg)
    for trace in (False, True):
        largest = (0, "", None, None)
        for name, layer in layers.items():
            step = _layer_step_bytes(cfg, layer, rows, diagnostics, where, trace)
            part, size = max(step.items(), key=lambda item: item[1], default=("", 0))
            if size > largest[0]:  # the layers step one after another: the largest step's working set counts
                largest = (size, f"{part} of {name}", name, (layer.d_in, layer.d_out))
        if largest[2] is not None:
            estimate.layer, estimate.layer_shape = largest[2], largest[3]
        if not trace and limit is not None and estimate.total + largest[0] > limit:
            break  # refused without the (slow) trace
    if largest[0] > 0:
        estimate.parts[largest[1]] = largest[0]
    return estimate


def available_memory(where: str) -> int | None:
    """Free bytes: the current CUDA device's for ``cuda``, else the RAM the OS can give (psutil if
    installed, else /proc/meminfo's MemAvailable); None where neither can be read."""
    if where == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _where(cfg: DictConfig) -> str:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator in ("mps", "tpu") or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "other"
    return "cpu"


def _driving_keys(cfg: DictConfig, shape: tuple[int, int] | None) -> list[str]:
    """The config keys behind the largest layer's size: task.model's numbers equal to one of its
    widths (else all of task.model's integers), and device.modes where set."""
    model = OmegaConf.to_container(cfg.task.model, resolve=True)
    numbers = {
        k: v for k, v in model.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "dropout"
    }
    keys = [f"task.model.{k}={v}" for k, v in numbers.items() if shape and v in shape]
    keys = keys or [f"task.model.{k}={v}" for k, v in numbers.items() if isinstance(v, int)]
    if OmegaConf.select(cfg, "device.modes", default=None) is not None:
        keys.append(f"device.modes={cfg.device.modes}")
    return keys


@contextlib.contextmanager
def _random_state_kept():
    """The global generators (torch's, CUDA's, NumPy's, Python's) as they were before the block."""
    import random

    import numpy as np

    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def check_memory(cfg: DictConfig, model_kwargs: dict) -> None:
    """Refuse (:class:`ConfigError`, one line naming the keys that drive the size) a run whose
    estimated memory exceeds :data:`SAFE_FRACTION` of what is available. Call it once the data is
    set up (``model_kwargs``: what the data tells the model) and before the model is built.
    ``memory_check: false`` leaves it out; so do DDP's child processes (the first one checked for
    all of this machine's processes)."""
    if not OmegaConf.select(cfg, "memory_check", default=True) or int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        return
    where = _where(cfg)
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default=""))
    if where == "other" or (where == "cuda" and ("fork" in strategy or "notebook" in strategy)):
        return  # no memory figure for MPS/TPU; a forking strategy needs CUDA untouched before it starts
    available = available_memory(where)
    if available is None:
        return
    with _random_state_kept():  # building the model draws initial weights: the run's own build must draw them
        estimate = estimate_memory(cfg, model_kwargs, where, limit=SAFE_FRACTION * available)
    if estimate is None:
        return
    processes = 1
    if where == "cpu" and "ddp" in strategy:
        devices = OmegaConf.select(cfg, "trainer.devices", default=1)
        processes = devices if isinstance(devices, int) and devices > 1 else 1
    needed = estimate.total * processes
    if needed <= SAFE_FRACTION * available:
        return
    part, largest = max(estimate.parts.items(), key=lambda item: item[1])
    keys = ", ".join(_driving_keys(cfg, estimate.layer_shape)) or "task.model"
    layer = (
        f" (physical layer {estimate.layer}: {estimate.layer_shape[0]} -> {estimate.layer_shape[1]})"
        if estimate.layer_shape
        else ""
    )
    hint = (
        " or callbacks.diagnostics.every_n_steps=0"
        if part.startswith("simulator autograd") and cfg.mode == "zo+sm"
        else ""
    )
    memory = "free GPU memory" if where == "cuda" else "RAM available"
    per = f" for {processes} processes" if processes > 1 else ""
    raise ConfigError(
        f"{keys}{layer}: the run needs about {needed / GB:.1f} GB{per} ({part}: {largest / GB:.1f} GB), "
        f"{available / GB:.1f} GB {memory}; choose a smaller size{hint} "
        f"(memory_check=false skips this check)."
    )
