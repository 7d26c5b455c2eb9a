"""LightningModules for hybrid networks: manual optimisation of digital and physical parameters.

One training step:

1. forward (the physical layers query their devices through their ledgers);
2. backward: the digital gradients by autograd, θ's ``.grad`` filled by the ZO estimator (or the
   oracle, in the oracle modes), the input gradients carried by the surrogates;
3. the digital optimizer steps (a LightningOptimizer, so ``global_step`` counts once per batch),
   the physical optimizer steps θ;
4. every HybridLayer's ``after_optimizer_step()``: drift, then the surrogate follows θ₀ → θ₁;
5. both schedulers step; metrics are logged (queries by purpose, surrogate health, θ change, and
   at an interval the oracle diagnostics).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from astraora import parallel
from astraora.build import hybrid_layers, make_optimizer, make_scheduler
from astraora.parallel import RankSync


class HybridModule(L.LightningModule):
    """What every task kind shares. Subclasses implement :meth:`loss_and_update_metrics`.

    Args:
        model: the backbone with its physical layer(s).
        optimizer: spec of the digital parameters' optimizer ({name, lr, weight_decay}).
        physical_optimizer: spec of θ's optimizer (paper: Adam, lr 1e-2); it also trains the
            layers' output scales s, with weight decay 0.
        scheduler: {name: cosine|constant, warmup_steps}, applied per step to both.
        physical_scheduler: θ's own schedule where it differs (None: ``scheduler``).
        diagnostics_every: run the oracle diagnostics every that many steps (0: never).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict,
        physical_optimizer: dict,
        scheduler: dict,
        diagnostics_every: int = 50,
        physical_scheduler: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.optimizer_spec, self.physical_optimizer_spec, self.scheduler_spec = (
            optimizer,
            physical_optimizer,
            scheduler,
        )
        self.physical_scheduler_spec = scheduler if physical_scheduler is None else physical_scheduler
        self.diagnostics_every = int(diagnostics_every)
        self.physical = hybrid_layers(model)
        self._sync: RankSync | None = None
        self._reduced_totals: dict | None = None
        self.distributed_info: dict | None = None  # figures of a data-parallel run, for summary.json

    # ----------------------------------------------------------------- data parallel
    def setup(self, stage: str) -> None:
        """Under DDP (before Lightning wraps the module): the physical layers exchange only their
        ZO coefficients and rank 0's surrogate; θ and the surrogate's buffers are kept out of
        DDP's gradient all-reduce and buffer broadcast (θ's ĝ is already the same everywhere)."""
        if parallel.world_size() == 1 or not self.physical or self._sync is not None:
            return
        self._sync = RankSync()
        for layer in self.physical.values():
            layer.attach_sync(self._sync)
        parallel.exclude_from_ddp(self, self.theta_parameters())

    def shared_buffers(self) -> list[Tensor]:
        """The digital network's floating-point buffers (BatchNorm running statistics): under
        DDP the same on every process, like the parameters. The physical layers' buffers are
        their own (the surrogate's are broadcast from rank 0, a device's follow its generators)."""
        physical = tuple(f"{name}." for name in self.physical)
        return [b for name, b in self.model.named_buffers() if b.is_floating_point() and not name.startswith(physical)]

    def average_buffers(self) -> None:
        """Under DDP, after every step: each process's :meth:`shared_buffers` replaced by their
        mean over the processes, so every process holds the same model (what a checkpoint, written
        by rank 0, stores and a resume restores everywhere). Each process's BatchNorm updated its
        running statistics from its own part of the batch; their mean is the running mean one
        process would have over the whole global batch. (DDP's own buffer broadcast does not
        cover this: under manual optimisation it runs only on the first forward of a new wrapper,
        i.e. at the start of a run and again, differently, after a resume; torch's SyncBatchNorm
        runs on GPUs only.)"""
        parallel.average_buffers(self.shared_buffers(), self._sync)

    def on_train_start(self) -> None:
        restore, self._buffers_to_restore = getattr(self, "_buffers_to_restore", None), None
        if restore:
            buffers = dict(self.named_buffers())
            with torch.no_grad():
                for key, value in restore.items():
                    buffers[key].copy_(value)
        self._zo_floats_at_start = self._sync.floats["zo"] if self._sync is not None else 0
        self._step_at_start = self.global_step

    def on_train_end(self) -> None:
        """Figures of a data-parallel run: floats exchanged per step for ZO and by DDP for the
        digital gradients, and how far θ, U, S, V and the digital buffers differ between the
        processes (0 expected)."""
        if self._sync is None:
            return
        sync, steps = self._sync, max(1, self.global_step - self._step_at_start)
        ddp = self.trainer.strategy.model
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        states = [
            t
            for layer in self.physical.values()
            for t in (layer.theta, layer.surrogate.U, layer.surrogate.S, layer.surrogate.V)
        ]
        states += self.shared_buffers()
        divergence = parallel.rank_divergence(sync, states)
        self.distributed_info = {
            "world_size": sync.world_size,
            "zo_floats_per_step": (sync.floats["zo"] - self._zo_floats_at_start) / steps,
            "theta_floats": sum(t.numel() for t in self.theta_parameters()),
            "ddp_gradient_floats_per_step": sum(
                p.numel() for name, p in ddp.module.named_parameters() if p.requires_grad and name not in ignored
            ),
            "theta_in_ddp_allreduce": any(
                p is t
                for name, p in ddp.module.named_parameters()
                if name not in ignored
                for t in self.theta_parameters()
            ),
            "max_rank_divergence": divergence,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Under DDP the checkpoint (written by rank 0) holds the ledgers' counts summed over the
        processes (what a resume with another number of processes starts from) and, under
        ``per_rank``, what differs between the processes: each one's physical-layer state (its own
        ledger counts, the θ its hardware holds, its noise and drift generators), its running
        metric states and its random generators. A resume with as many processes gives every
        process its own; with another number, rank 0 takes the sums and the others start from zero.
        Checkpoints are taken at step boundaries only, every process together (never after a process
        stopped: a failed run resumes from its last periodic checkpoint)."""
        if self._sync is None:
            return
        mine = {
            "layers": {name: layer.get_extra_state() for name, layer in self.physical.items()},
            # running metric states and buffers (the digital ones are the same everywhere, see
            # average_buffers; a physical layer's may be its process's own)
            "metrics": {k: v for k, v in checkpoint["state_dict"].items() if self._is_per_rank_state(k)},
            "rng_states": checkpoint.get("rng_states"),
        }
        per_rank = self._sync.gather_object(mine)
        if per_rank is not None:  # rank 0: the process that writes the checkpoint
            parallel.add_per_rank(checkpoint, per_rank, self._layer_keys())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if parallel.world_size() == 1:
            return
        self._is_per_rank_state("")  # builds the key sets
        rank, world = torch.distributed.get_rank(), parallel.world_size()
        mine = parallel.take_per_rank(checkpoint, rank, world, self._layer_keys())
        if mine is not None:
            # DDP's wrapper copies rank 0's buffers to every process after this: set them again then
            self._buffers_to_restore = {k: v for k, v in mine.items() if k in self._per_rank_keys}

    def _layer_keys(self) -> dict[str, str]:
        """The state_dict key of each physical layer's checkpoint state, by layer name."""
        return {name: f"model.{name}._extra_state" for name in self.physical}

    def _is_per_rank_state(self, key: str) -> bool:
        """Whether a state_dict key is a running metric's state or a buffer that each process
        keeps for itself (the surrogate's are the same everywhere)."""
        if not hasattr(self, "_per_rank_keys"):
            self._metric_prefixes = tuple(
                f"{name}." for name, m in self.named_modules() if isinstance(m, torchmetrics.Metric)
            )
            self._per_rank_keys = {name for name, _ in self.named_buffers() if ".surrogate." not in f".{name}"}
        return key in self._per_rank_keys or key.startswith(self._metric_prefixes)

    # ----------------------------------------------------------------- optimizers
    def theta_parameters(self) -> list[nn.Parameter]:
        return [layer.theta for layer in self.physical.values()]

    def scale_parameters(self) -> list[nn.Parameter]:
        """The physical layers' output scales s (y = s · query(x))."""
        return [layer.scale for layer in self.physical.values() if layer.scale is not None]

    def configure_optimizers(self):
        # s is trained with θ's optimizer, as in the paper, without weight decay (it is a gain to
        # match, not a weight to shrink)
        physical_ids = {id(p) for p in self.theta_parameters() + self.scale_parameters()}
        digital = [p for p in self.parameters() if id(p) not in physical_ids]
        total = self.total_training_steps()
        optimizers = [make_optimizer(digital, self.optimizer_spec)]
        if self.physical:
            groups = [{"params": self.theta_parameters()}]
            if self.scale_parameters():
                groups.append({"params": self.scale_parameters(), "weight_decay": 0.0})
            optimizers.append(make_optimizer(groups, self.physical_optimizer_spec))
        specs = [self.scheduler_spec, self.physical_scheduler_spec][: len(optimizers)]  # digital runs: one optimizer
        schedulers = [make_scheduler(opt, spec, total) for opt, spec in zip(optimizers, specs, strict=True)]
        return optimizers, schedulers

    def total_training_steps(self) -> int:
        """Steps the schedule spans. Computed here rather than with Lightning's
        ``estimated_stepping_batches``, which builds the train loader before a checkpoint's loader
        state is restored and so breaks an exact mid-epoch resume."""
        if self._trainer is None:
            return 1
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = len(trainer.datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000
        return max(1, batches * epochs)

    # ----------------------------------------------------------------- training
    def loss_and_update_metrics(self, batch, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        diagnose = self.diagnostics_every > 0 and self.global_step % self.diagnostics_every == 0
        log_now = self._logs_this_step()
        for layer in self.physical.values():
            layer.capture_next_backward = diagnose
            layer.measure_residual = log_now  # the health check itself runs whenever a threshold is set
        theta_before = [t.detach().clone() for t in self.theta_parameters()] if log_now else []
        total_before = sum(layer.ledger.total for layer in self.physical.values())  # this process's, no collective

        for opt in optimizers:
            opt.zero_grad()
        loss = self.loss_and_update_metrics(batch, "train")
        if self._sync is not None:  # every process's forward went through (or stop together: DDP's
            self._sync.check()  # gradient all-reduce cannot notice a process that stopped)
        self.manual_backward(loss)
        if diagnose:  # before θ moves: the captured gradients and Â belong to this θ
            self.log_diagnostics(self.diagnostics())
        optimizers[0].step()  # LightningOptimizer: advances global_step once per batch
        if len(optimizers) > 1:
            optimizers[1].optimizer.step()  # θ: the raw torch optimizer, not counted as a second step
            for layer in self.physical.values():
                layer.after_optimizer_step()
        for scheduler in schedulers:
            scheduler.step()
        self.average_buffers()

        for layer in self.physical.values():
            layer.capture_next_backward = False
        self.log("train/loss", loss.detach(), prog_bar=True)
        if log_now:
            self._log_physical(theta_before, total_before)
        return loss.detach()

    def _logs_this_step(self) -> bool:
        """Whether the loggers write this step's row (every ``trainer.log_every_n_steps``): the
        physical layers' counters, θ change and residual are only gathered then."""
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

    def log_diagnostics(self, diagnostics: dict[str, float]) -> None:
        """Written straight to the loggers at this step only (``self.log`` would repeat the last
        value on every later logged step, as if it had been measured there)."""
        if not diagnostics:
            return
        for logger in self.loggers:
            logger.log_metrics(diagnostics, step=self.global_step)

    def _log_physical(self, theta_before: list[Tensor], total_before: int) -> None:
        if not self.physical:
            return
        if self._sync is None:
            totals = self.query_totals()
            per_step = totals["queries/total"] - total_before
        else:  # this step's queries of every process, summed along with the totals
            local = sum(layer.ledger.total for layer in self.physical.values())
            totals = self.query_totals(extra={"queries/per_step": local - total_before})
            per_step = totals.pop("queries/per_step")
        self.log_dict({key: float(n) for key, n in totals.items() if key != "queries/oracle"})
        self.log("queries/per_step", float(per_step))
        self.log("queries", float(totals["queries/total"]), prog_bar=True, logger=False)
        delta = sum(
            float((t.detach() - b).norm() ** 2) for t, b in zip(self.theta_parameters(), theta_before, strict=True)
        )
        norm = sum(float(b.norm() ** 2) for b in theta_before)
        self.log("device/theta_delta", math.sqrt(delta / max(norm, 1e-30)))
        residuals = [r for r in (layer.health.last_residual for layer in self.physical.values()) if r is not None]
        if residuals:
            self.log("surrogate/residual", float(sum(residuals) / len(residuals)))

    # ----------------------------------------------------------------- evaluation
    def validation_step(self, batch, batch_idx: int) -> None:
        self.loss_and_update_metrics(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.loss_and_update_metrics(batch, "test")

    # ----------------------------------------------------------------- physical-layer readouts
    def query_totals(self, collective: bool = True, extra: dict | None = None) -> dict[str, int]:
        """The ledgers' counters (:meth:`QueryLedger.counts`) summed over the physical layers and,
        under DDP, over the processes (each really sent its queries; the surrogate's are made on
        rank 0 only, so they are counted once). Under DDP every process must call this together;
        ``collective=False`` returns the last summed totals instead (e.g. from a rank-0-only
        logger, or after a process stopped: then summary.json reports the totals of the last
        logged step, ``trainer.log_every_n_steps``). ``extra`` counters are summed along."""
        totals: dict[str, int] = dict(extra or {})
        for layer in self.physical.values():
            for key, n in layer.ledger.counts().items():
                totals[key] = totals.get(key, 0) + n
        if self._sync is None:
            return totals
        if not collective:
            return dict(self._reduced_totals) if self._reduced_totals is not None else totals
        totals = parallel.sum_over_ranks(self._sync, totals)
        self._reduced_totals = {k: v for k, v in totals.items() if k not in (extra or {})}
        return totals

    def diagnostics(self) -> dict[str, float]:
        """Oracle diagnostics averaged over the physical layers that have a simulator (a device
        served over the network has none: its layers are skipped)."""
        collected: dict[str, list[float]] = {}
        for layer in self.physical.values():
            if not layer.device.has_simulator:
                continue
            for key, value in layer.diagnostics().items():
                collected.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in collected.items()}


class ClassificationModule(HybridModule):
    """Cross-entropy classification; logs ``<stage>/loss`` and ``<stage>/acc``."""

    def __init__(self, model: nn.Module, num_classes: int, **kwargs):
        super().__init__(model, **kwargs)
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
                for s in ("train", "val", "test")
            }
        )
        for metric in self.acc.values():
            metric.persistent(True)  # a mid-epoch checkpoint carries the epoch's running accuracy

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        self._resumed_mid_epoch = not progress.get("is_last_batch", True)

    def on_train_epoch_start(self) -> None:
        # the running training accuracy restarts with each epoch, except in the epoch a mid-epoch
        # checkpoint is resumed into (its state came with the checkpoint)
        if not getattr(self, "_resumed_mid_epoch", False):
            self.acc["train_acc"].reset()
        self._resumed_mid_epoch = False

    def loss_and_update_metrics(self, batch, stage: str) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = self.acc[f"{stage}_acc"]
        acc(logits.detach(), y)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=stage == "train", on_epoch=True)
        if stage != "train":
            # under DDP each process evaluates its shard: the epoch's loss is their mean (the
            # accuracy metric gathers its counts itself)
            self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_epoch=True, sync_dist=True)
        return loss


class LanguageModelModule(HybridModule):
    """Next-token prediction; logs ``<stage>/loss``, ``<stage>/ppl`` and, for character-level
    data, ``<stage>/bpc`` (bits per character)."""

    def __init__(self, model: nn.Module, char_level: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        self.char_level = bool(char_level)
        self.mean_loss = nn.ModuleDict({f"{s}_loss": torchmetrics.MeanMetric() for s in ("val", "test")})

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def loss_and_update_metrics(self, batch, stage: str) -> Tensor:
        idx, targets = batch
        logits = self.model(idx)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if stage != "train":
            self.mean_loss[f"{stage}_loss"].update(loss.detach(), weight=targets.numel())
        return loss

    def _log_eval(self, stage: str) -> None:
        loss = self.mean_loss[f"{stage}_loss"].compute()
        self.mean_loss[f"{stage}_loss"].reset()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", torch.exp(loss), prog_bar=stage == "val")
        if self.char_level:
            self.log(f"{stage}/bpc", loss / math.log(2))

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
