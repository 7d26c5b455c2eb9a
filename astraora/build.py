"""From a composed config to the objects of a run: layer factory, backbone, optimizers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from astraora.config import OPTIMIZERS
from astraora.errors import AstraoraError, ConfigError
from astraora.hybrid import HybridLayer
from astraora.rng import make_generator
from astraora.surrogate.auto import psi_queries, readout_rank, resolve_integrator, resolve_rank
from astraora.zo import make_estimator, reuses_readout
from astraora.zo.colored import ColoredEstimator

LayerFactory = Callable[[int, int, str], nn.Module]
log = logging.getLogger("astraora")


def instantiate(config, **kwargs):
    """Hydra's instantiate, but our own one-line errors come out unwrapped."""
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, AstraoraError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# keys of a conf/device entry that are not constructor arguments: the family's name (summaries, tags)
# and the ledger's driver settings (read by make_layer_factory)
RUN_KEYS = ("family", "driver")


def device_spec(device_cfg: DictConfig | dict) -> dict:
    """A ``conf/device`` entry as constructor arguments (without :data:`RUN_KEYS`)."""
    if not OmegaConf.is_config(device_cfg):
        return {key: value for key, value in device_cfg.items() if key not in RUN_KEYS}
    return {
        key: OmegaConf.to_container(device_cfg[key], resolve=True)
        if OmegaConf.is_config(device_cfg[key])
        else device_cfg[key]
        for key in device_cfg
        if key not in RUN_KEYS
    }


def make_device(device_cfg: DictConfig | dict, d_in: int, d_out: int, seed: int, name: str):
    """A device from its ``conf/device`` entry (see :data:`RUN_KEYS` for the keys that are not
    constructor arguments)."""
    return instantiate(device_spec(device_cfg), d_in=d_in, d_out=d_out, seed=seed, name=name, _convert_="all")


def make_layer_factory(cfg: DictConfig) -> LayerFactory:
    """``factory(d_in, d_out, name)``: a HybridLayer on the configured device, or a Linear for
    ``device=digital``. ``name`` seeds that layer's generators (ZO directions, sketches, noise)."""
    if cfg.device.family == "digital":
        return lambda d_in, d_out, name: nn.Linear(d_in, d_out)
    driver = cfg.device.driver
    zo_cfg = OmegaConf.to_container(cfg.zo, resolve=True)
    integrator_cfg = OmegaConf.to_container(cfg.integrator, resolve=True)

    def factory(d_in: int, d_out: int, name: str) -> nn.Module:
        device = make_device(cfg.device, d_in, d_out, cfg.seed, name)
        zo = (
            make_estimator(zo_cfg, generator=make_generator(cfg.seed, name, "zo"))
            if cfg.mode.startswith("zo")
            else None
        )
        rank = resolve_rank(cfg.surrogate.rank, d_in, d_out)  # `auto`: by this layer's size
        integrator = resolve_integrator(integrator_cfg, d_in, rank, estimate_reuses_readout=reuses_readout(zo))
        rank = readout_rank(cfg.surrogate.get("readout_rank", "same"), integrator, d_in, d_out, rank)
        if isinstance(zo, ColoredEstimator):
            warn_if_colored_costs_more(zo, device, int(cfg.task.datamodule.batch_size), rank, name)
        return HybridLayer(
            device,
            mode=cfg.mode,
            rank=rank,
            zo=zo,
            integrator=integrator,
            output_scale=cfg.surrogate.output_scale,
            output_bias=cfg.surrogate.get("output_bias", False),
            health_threshold=cfg.surrogate.health_threshold,
            health_growth=cfg.surrogate.get("health_growth"),
            max_retries=driver.max_retries,
            timeout_s=driver.timeout_s,
            seed=cfg.seed,
            name=name,
        )

    return factory


# The paper's random-direction settings the colored differences are weighed against.
PAPER_M, PAPER_M_SM = 100, 100


def colored_crossover(zo, device, batch: int, rank: int) -> tuple[int, int]:
    """Queries per step for θ's gradient and the surrogate's upkeep: colored differences (a full
    readout of n rows, whose reading the k·n one-sided differences reuse: (k + 1)·n; 2k·n + n
    two-sided) against the paper's M = 100 random directions on min(B, m) rows plus psi_implicit's
    2r + 2·M_sm (docs/ALGORITHM.md §9). The forward pass's B rows are the same for both."""
    n, m = device.d_in, device.d_out
    k = zo.colors(zo.offsets_of(device))
    colored = (2 * k + 1) * n if zo.two_sided else (k + 1) * n
    random = PAPER_M * min(batch, m) + psi_queries(rank, PAPER_M_SM)
    return colored, random


def warn_if_colored_costs_more(zo, device, batch: int, rank: int, name: str) -> None:
    """Colored differences cost (k + 1)·n per step, random directions M·min(B, m) + 2r + 2·M_sm: for
    wide layers (the paper's 6144 → 192 SLM) the random directions are the cheaper estimate."""
    try:
        colored, random = colored_crossover(zo, device, batch, rank)
    except AstraoraError:
        return  # a device without the entry-wise structure is refused elsewhere, with its own message
    if colored > random:
        log.warning(
            "physical layer %s (%d -> %d): zo=colored costs %d queries per step here, against %d for the "
            "paper's M = 100 random directions with psi_implicit (batch %d, rank %d); zo=gaussian is the "
            "cheaper estimate at this size (docs/ALGORITHM.md §9).",
            name,
            device.d_in,
            device.d_out,
            colored,
            random,
            batch,
            rank,
        )


def build_model(cfg: DictConfig, model_kwargs: dict) -> nn.Module:
    """The task's backbone with its physical layer(s) placed by the factory."""
    model = instantiate(cfg.task.model, layer_factory=make_layer_factory(cfg), **model_kwargs)
    if cfg.device.family != "digital" and not hybrid_layers(model):
        raise ConfigError(f"task.model={cfg.task.model._target_} placed no physical layer.")
    return model


def hybrid_layers(model: nn.Module) -> dict[str, HybridLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HybridLayer)}


def make_optimizer(params, spec: DictConfig | dict) -> torch.optim.Optimizer:
    name, lr, wd = spec["name"], float(spec["lr"]), float(spec.get("weight_decay", 0.0))
    adam = {} if spec.get("betas") is None else {"betas": tuple(float(b) for b in spec["betas"])}  # else torch's
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **adam)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **adam)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.9)))
    raise ConfigError(f"optimizer name={name!r} is not allowed; choose one of {list(OPTIMIZERS)}.")


def make_scheduler(optimizer: torch.optim.Optimizer, spec: DictConfig | dict, total_steps: int):
    """Per-step schedule: linear warm-up, then cosine decay to 0 over ``total_steps`` (or constant)."""
    warmup = int(spec.get("warmup_steps", 0))
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec["name"] == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * progress)).item())

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
