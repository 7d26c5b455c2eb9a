"""The paper authors' training loop around an unchanged HybridLayer, for the surrogate's timing
(scripts/stale_surrogate_study.py).

astraora updates the surrogate right after the optimizer step on θ (HybridLayer.after_optimizer_step),
so the backward of step t carries the input gradient through Â(θ_t), the surrogate of the θ the
forward pass used. The authors' loop differs in two ways that their code does not state:

* ``stale``: the factors U, S, V are saved for the backward before the update that follows θ's last
  change is applied, so the backward of step t uses Â(θ_{t−1}): the input gradient is G·Â(θ_{t−1}).
* ``lost``: the update after an evaluation pass is dropped: the surrogate's reference θ moves on
  without the factors following it, so one increment ΔA is missing from then on (until a full
  readout, which ``psi_implicit`` without ``rebuild_every`` never makes).

:class:`AuthorsOrder`, a Lightning callback, wraps each physical layer's ``input_grad`` and
``after_optimizer_step`` (:class:`SurrogateOrder`). Every variant also measures, at each backward, the
relative error ‖Â_used − A(θ_t)‖/‖A(θ_t)‖ of the surrogate the backward used and the cosine of its input
gradient to the true G·A(θ_t) (oracle diagnostics: no query), written to ``stale.json`` by :func:`with_order`.
"""

import json
import statistics
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from astraora.report.compare import STALE_VARIANTS as VARIANTS


class SurrogateOrder:
    """Wraps one HybridLayer (its instance methods, the class untouched) to run the authors' order.

    ``stale``: the backward uses the factors as they were before the last update (the surrogate of
    the θ before last). ``lost``: after :meth:`evaluation_pass`, the next update is dropped: the
    reference θ moves to the new θ and the factors stay. Every variant records the relative error of
    the factors its backward used against the true matrix at the θ of that step's forward pass.
    """

    def __init__(self, layer, stale: bool, lost: bool):
        if not layer.uses_surrogate:
            raise ValueError(f"layer {layer.name!r} (mode={layer.mode}) has no surrogate to reorder")
        if layer.sync is not None:
            raise ValueError("the emulation runs one process only (no data-parallel training)")
        self.layer, self.stale, self.lost = layer, bool(stale), bool(lost)
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # factors before the last update
        self.drop_next = False
        self.dropped = 0
        self.errors: list[float] = []  # ‖Â_used − A(θ_t)‖ / ‖A(θ_t)‖ at each backward
        self.best_errors: list[float] = []  # the best rank-r error of A(θ_t), for reference
        self.cosines: list[float] = []  # cosine of G·Â_used to the true input gradient G·A(θ_t)
        self.moves: list[float] = []  # ‖A(θ_t) − A(θ_{t−1})‖ / ‖A(θ_t)‖: what one stale step misses
        self._last_truth: torch.Tensor | None = None
        self._input_grad, self._after_step = layer.input_grad, layer.after_optimizer_step
        layer.input_grad = self.input_grad
        layer.after_optimizer_step = self.after_optimizer_step

    def used_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, V the backward uses now (the first step, with nothing older, uses the readout)."""
        sur = self.layer.surrogate
        return self.previous if self.stale and self.previous is not None else (sur.U, sur.S, sur.V)

    @torch.no_grad()
    def input_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        u, s, v = self.used_factors()
        truth = self.layer.ledger.oracle_matrix().detach().to(u.dtype)  # A at the θ of this step's forward
        norm = truth.norm().clamp_min(1e-12)
        self.errors.append(float((u @ s @ v.T - truth).norm() / norm))
        sigma = torch.linalg.svdvals(truth.double())
        self.best_errors.append(float(sigma[u.shape[1] :].norm() / sigma.norm().clamp_min(1e-300)))
        if self._last_truth is not None:
            self.moves.append(float((truth - self._last_truth).norm() / norm))
        self._last_truth = truth
        if self.stale:
            grad = ((g @ u) @ s) @ v.T
            if self.layer.capture_next_backward:
                self.layer._captured.update(x=x.detach(), g=g.detach(), grad_x=grad.detach())
        else:
            grad = self._input_grad(x, g)
        self.cosines.append(
            float(
                torch.nn.functional.cosine_similarity(
                    grad.reshape(1, -1).double(), (g @ truth).reshape(1, -1).double()
                ).item()
            )
        )
        return grad

    def evaluation_pass(self) -> None:
        if self.lost:
            self.drop_next = True

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        layer, sur = self.layer, self.layer.surrogate
        ready = bool(sur.initialized)
        if self.stale and ready:
            self.previous = (sur.U.clone(), sur.S.clone(), sur.V.clone())
        if self.drop_next and ready and not layer.integrator.reads_out(layer.theta_updates + 1):
            self.drop_next = False
            self.dropped += 1
            layer.theta_updates += 1
            layer.ledger.step_drift()
            # the increment θ_ref → θ is never applied: the factors stay, their reference moves on
            sur.set_factors(sur.U.clone(), sur.S.clone(), sur.V.clone(), layer.theta.detach())
            return
        self._after_step()


class AuthorsOrder(L.Callback):
    """Installs :class:`SurrogateOrder` on every physical layer when training starts and tells it
    of every evaluation pass run during training (not the sanity check, not the final test)."""

    def __init__(self, variant: str):
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not allowed; choose one of {VARIANTS}")
        self.variant = variant
        self.orders: dict[str, SurrogateOrder] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        stale, lost = self.variant != "fresh", self.variant == "stale+lost"
        self.orders = {name: SurrogateOrder(layer, stale, lost) for name, layer in pl_module.physical.items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            for order in self.orders.values():
                order.evaluation_pass()

    def stats(self) -> dict:
        def mean(key: str) -> float | None:
            values = [e for o in self.orders.values() for e in getattr(o, key)]
            return statistics.fmean(values) if values else None

        return {
            "variant": self.variant,
            "backwards": sum(len(o.errors) for o in self.orders.values()),
            "rel_error_mean": mean("errors"),
            "best_rank_error_mean": mean("best_errors"),
            "grad_cosine_mean": mean("cosines"),
            "step_move_mean": mean("moves"),
            "dropped": sum(o.dropped for o in self.orders.values()),
        }


def with_order(variant: str):
    """Wrap :func:`astraora.train.run`: :class:`AuthorsOrder` (``variant``) on the run; its stats to stale.json."""

    def wrap(true_run):
        def run(cfg, callbacks=()):
            order = AuthorsOrder(variant)
            summary = true_run(cfg, [*callbacks, order])
            (Path(cfg.paths.output_dir) / "stale.json").write_text(json.dumps(order.stats(), indent=1))
            return summary

        return run

    return wrap
