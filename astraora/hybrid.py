"""HybridLayer: a physical device inside a digital network, trained end to end.

Forward: ``y = s · query(x) + b`` through the ledger (``s`` an optional trainable output scale,
``b`` an optional digital bias, off by default).
Backward, by gradient mode (ALGORITHM.md §6):

| mode       | θ-gradient                  | x-gradient                      |
|------------|-----------------------------|---------------------------------|
| ``zo+sm``  | ZO estimate (queries)       | low-rank surrogate G Â          |
| ``exact+sm`` | autograd through simulator | low-rank surrogate G Â          |
| ``zo+exact`` | ZO estimate (queries)       | autograd through simulator      |
| ``exact``  | autograd through simulator  | autograd through simulator      |

When the surrogate is updated: right after the optimizer has changed θ, through
:meth:`HybridLayer.after_optimizer_step`, which the training loop calls once per θ-update. Doing it
there (rather than lazily at the next forward) charges the integrator's queries to the step that
moved θ, leaves the hardware programmed at the new θ for the next forward (no extra reprogram), and
keeps the surrogate current for anyone who reads it between steps (diagnostics, checkpoints).

The pieces around it: the surrogate, its integrators and its health check in
:mod:`astraora.surrogate`; the collectives of data-parallel training in :mod:`astraora.parallel`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astraora.choices import MODES
from astraora.devices.base import Device
from astraora.errors import ConfigError
from astraora.ledger import QueryLedger
from astraora.parallel import RankSync
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, SurrogateHealth, make_integrator
from astraora.surrogate.health import cosine
from astraora.surrogate.lowrank import best_rank_error
from astraora.zo import ColoredEstimator, ZOEstimator, reuses_readout
from astraora.zo.validation import zo_step_problem


class _PhysicalLayerFunction(torch.autograd.Function):
    """y = query(x) forward; the layer's gradient mode decides the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, layer: HybridLayer) -> Tensor:
        y = layer.ledger.query(x, "forward")
        ctx.layer = layer
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        layer: HybridLayer = ctx.layer
        grad_x = layer.input_grad(x, g) if ctx.needs_input_grad[0] else None
        grad_theta = layer.theta_grad(x, g, y) if ctx.needs_input_grad[1] else None
        return grad_x, grad_theta, None


class HybridLayer(nn.Module):
    """A black-box device with its ledger, surrogate, ZO estimator and integrator.

    Args:
        device: the physical layer (owns θ as ``device.theta``).
        mode: one of ``zo+sm``, ``exact+sm``, ``zo+exact``, ``exact``.
        rank: surrogate rank r (1 ≤ r ≤ min(d_in, d_out)).
        zo: a :class:`ZOEstimator` or :class:`ColoredEstimator` (needed for ``zo+*`` modes).
        integrator: name of the surrogate update rule and its schedule options
            (``name``, ``every``, ``samples``, ``sketch``, ``rebuild_every``).
        output_scale: learn a digital scalar s with y = s · query(x).
        output_bias: add a digital bias b ∈ R^m, y = s · query(x) + b (trained by the digital
            optimizer, like the bias of the digital twin's Linear).
        health_threshold: if set, a training forward whose residual ‖Y − X Âᵀ‖/‖Y‖ exceeds it
            triggers a full readout rebuild of the surrogate (counted as ``readout``;
            :class:`~astraora.surrogate.health.SurrogateHealth` holds the rules and their state).
        health_growth: if set, a full readout when the surrogate's error over the best rank-r
            error, both on the inputs the last few training batches span
            (:func:`~astraora.surrogate.health.batch_view`),
            exceeds (1 + health_growth) times that ratio first measured after the last full
            readout (right after a readout the surrogate is the best rank-r one, so this bounds how
            far an integrator that only approximates the update, such as psi_implicit, may drift,
            also while the device's own best rank-r error changes). Free in queries: both come
            from the forward pass's own inputs and readings.
        max_retries, timeout_s: the ledger's fault handling.
        seed, name: the run seed and this layer's stable name (seed its generators).
    """

    def __init__(
        self,
        device: Device,
        *,
        mode: str = "zo+sm",
        rank: int = 10,
        zo: ZOEstimator | ColoredEstimator | None = None,
        integrator: dict | None = None,
        output_scale: bool = True,
        output_bias: bool = False,
        health_threshold: float | None = None,
        health_growth: float | None = None,
        max_retries: int = 3,
        timeout_s: float | None = None,
        seed: int = 0,
        name: str = "physical",
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed; choose one of {MODES}.")
        if mode != "zo+sm" and not device.has_simulator:
            raise ConfigError(
                f"mode={mode!r} needs the true device matrix, but {type(device).__name__} has no simulator; "
                "use mode=zo+sm."
            )
        if mode.startswith("zo") and zo is None:
            raise ConfigError(f"mode={mode!r} needs a ZO estimator (the zo config group).")
        if mode.startswith("zo"):
            problem = zo_step_problem(device.nonideal.phase_bits, device.nonideal.queries, zo.mu)
            if problem:
                raise ConfigError(problem)
            if isinstance(zo, ColoredEstimator):
                zo.offsets_of(device)  # refuses a device without declared entry-wise structure
        self.device, self.mode, self.name = device, mode, name
        # the last full readout is kept only for an estimator that reuses it (an m × n matrix per layer)
        keep = mode.startswith("zo") and reuses_readout(zo)
        self.ledger = QueryLedger(device, max_retries=max_retries, timeout_s=timeout_s, keep_readings=keep)
        self.zo = zo
        self.uses_surrogate = mode.endswith("+sm")
        self.surrogate = LowRankSurrogate(device.d_in, device.d_out, rank, tuple(device.theta.shape), layer=name)
        integrator = dict(integrator or {"name": "psi_implicit"})
        self.integrator = make_integrator(
            integrator.pop("name"), generator=make_generator(seed, name, "sketch"), **integrator
        )
        self.scale = nn.Parameter(torch.ones(())) if output_scale else None
        self.bias = nn.Parameter(torch.zeros(device.d_out)) if output_bias else None
        self.health = SurrogateHealth(health_threshold, health_growth)
        self.theta_updates = 0
        self.capture_next_backward = False  # set by the trainer when it wants gradient cosines
        self.measure_residual = True  # the trainer clears it on steps that log no residual
        self._captured: dict[str, Tensor] = {}
        self.sync: RankSync | None = None  # set by attach_sync under data-parallel training

    @property
    def d_in(self) -> int:
        return self.device.d_in

    @property
    def d_out(self) -> int:
        return self.device.d_out

    @property
    def theta(self) -> nn.Parameter:
        return self.device.theta

    @property
    def health_rebuilds(self) -> int:
        """Full readouts triggered by the health checks."""
        return self.health.rebuilds

    def extra_repr(self) -> str:
        return f"mode={self.mode}, rank={self.surrogate.rank}, integrator={self.integrator.name}"

    # ----------------------------------------------------------------- data parallel
    def attach_sync(self, sync: RankSync | None) -> None:
        """Train as one of several data-parallel processes (None: alone again)."""
        self.sync = sync if sync is not None and sync.world_size > 1 else None
        if self.zo is not None:
            self.zo.reducer = self.sync.mean if self.sync is not None else None

    def _on_rank0_then_broadcast(self, update) -> None:
        """Run ``update()`` (which may change the surrogate) on rank 0 only, then give every
        process rank 0's factors: the queries are made once, the factors are identical."""
        if self.sync is None:
            update()
            return
        if self.sync.rank == 0:
            update()
        sur, theta = self.surrogate, self.device.theta.detach()
        # flags: initialised; θ_ref is the current θ (an update sets it so; else it kept the value
        # every process already shares), so θ_ref never needs to be sent
        flags = torch.stack([sur.initialized, torch.tensor(torch.equal(sur.theta_ref, theta), device=sur.U.device)]).to(
            sur.U.dtype
        )
        packed = self.sync.broadcast(torch.cat([flags, sur.U.reshape(-1), sur.S.reshape(-1), sur.V.reshape(-1)]))
        if self.sync.rank != 0 and bool(packed[0]):
            m, n, r = self.d_out, self.d_in, sur.rank
            u, s, v = packed[2:].split([m * r, r * r, n * r])
            sur.set_factors(
                u.view(m, r), s.view(r, r), v.view(n, r), theta if bool(packed[1]) else sur.theta_ref.clone()
            )

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_in)
        if self.training and self.uses_surrogate and not bool(self.surrogate.initialized):
            self._read_out()
        y = _PhysicalLayerFunction.apply(x2, self.device.theta, self)
        if self.training and self.uses_surrogate and (self.measure_residual or self.health.active):
            self._check_health(x2.detach(), y.detach())
        if self.scale is not None:
            y = self.scale * y
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.d_out)

    @torch.no_grad()
    def _check_health(self, x: Tensor, y: Tensor) -> None:
        """The surrogate's residual on this batch, from queries already made (no extra cost), and a
        full readout where the health rules ask for one."""
        view = self.health.wants_view(self.integrator.reads_out, self.theta_updates)
        sq = self.health.sums(x, y, self.surrogate.apply(x), self.surrogate.rank, view)
        if self.sync is not None:  # the whole batch's, so that every process takes the same decision
            sq = self.sync.sum(sq)
        if self.health.decide(sq, view, 1 if self.sync is None else self.sync.world_size):
            self._read_out()

    def _read_out(self) -> None:
        """A full readout of the surrogate (on rank 0, then broadcast); the next residual measured
        becomes the reference of ``health_growth``."""
        self._on_rank0_then_broadcast(lambda: self.surrogate.readout(self.ledger))
        self.health.reset()

    # ----------------------------------------------------------------- backward pieces
    def input_grad(self, x: Tensor, g: Tensor) -> Tensor:
        """∂L/∂X (B, n) from upstream G (B, m)."""
        if self.uses_surrogate:
            grad = self.surrogate.input_grad(g)
        else:
            grad = g @ self.ledger.oracle_matrix().detach()
        if self.capture_next_backward:
            self._captured.update(x=x.detach(), g=g.detach(), grad_x=grad.detach())
        return grad

    def theta_grad(self, x: Tensor, g: Tensor, y: Tensor) -> Tensor | None:
        """∂L/∂θ from upstream G: the ZO estimate or the oracle VJP. A non-finite ZO estimate is
        skipped (θ keeps no gradient this step) and counted in ``ledger.skipped['zo']``."""
        if self.mode.startswith("zo"):
            if self.sync is not None and isinstance(self.zo, ColoredEstimator):
                grad = self._colored_once(x, g)
            else:
                grad = self.zo.estimate(self.ledger, x, g, y)
            if not torch.isfinite(grad).all():
                self.ledger.skipped["zo"] += 1
                return None
        else:
            grad = self.exact_theta_grad(x, g)
        if self.capture_next_backward:
            self._captured.update(x=x.detach(), g=g.detach(), grad_theta=grad.detach())
        return grad

    def _colored_once(self, x: Tensor, g: Tensor) -> Tensor:
        """Data-parallel colored finite differences. They read the whole matrix out at each color's
        setting, whatever the batch, so a process per shard would repeat every reading: instead the
        shards' C = Gᵀ X are averaged (m·n floats; the estimate is linear in C), rank 0 alone
        measures, for that C (X = I, G = Cᵀ), and its estimate is broadcast (m·n floats). The queries
        per step are one process's; every process gets the same ĝ, from the same readings."""
        theta = self.device.theta.detach()
        c = self.sync.mean((g.T @ x).to(theta.dtype))
        grad = torch.zeros_like(theta)
        if self.sync.rank == 0:
            reducer, self.zo.reducer = self.zo.reducer, None
            try:
                eye = torch.eye(self.d_in, dtype=theta.dtype, device=theta.device)
                grad = self.zo.estimate(self.ledger, eye, c.T)
            finally:
                self.zo.reducer = reducer
        return self.sync.broadcast(grad, "zo")

    def exact_theta_grad(self, x: Tensor, g: Tensor) -> Tensor:
        """The true VJP ∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ by autograd through the simulator (oracle)."""
        with torch.enable_grad():
            theta = self.device.theta.detach().requires_grad_(True)
            phi = (self.ledger.oracle_simulate(x, theta) * g).sum()
            return torch.autograd.grad(phi, theta)[0]

    # ----------------------------------------------------------------- after θ changed
    def after_optimizer_step(self) -> None:
        """Call once after each optimizer step on θ: advances drift, then updates the surrogate."""
        self.theta_updates += 1
        self.ledger.step_drift()  # drops any reading taken before the drift step
        if self.uses_surrogate and bool(self.surrogate.initialized):
            if self.integrator.reads_out(self.theta_updates):
                self.health.reset()
            if self.sync is None:
                self.integrator.step(self.surrogate, self.ledger, self.theta_updates)
                return
            step, integ = self.theta_updates, self.integrator
            if integ.due(step):  # only then: the broadcast is a collective every process must join
                self._on_rank0_then_broadcast(lambda: integ.step(self.surrogate, self.ledger, step))

    # ----------------------------------------------------------------- diagnostics (oracle)
    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Surrogate error vs the true matrix and, if a backward was captured, gradient cosines."""
        out: dict[str, float] = {}
        a = self.ledger.oracle_matrix().detach()
        if self.uses_surrogate and bool(self.surrogate.initialized):
            out["surrogate/rel_error"] = float((self.surrogate.matrix() - a).norm() / a.norm().clamp_min(1e-12))
            out["surrogate/rel_error_best_rank_r"] = best_rank_error(a, self.surrogate.rank)
        cap, self._captured = self._captured, {}
        if "grad_x" in cap:
            out["surrogate/grad_cosine"] = cosine(cap["grad_x"], cap["g"] @ a)
        if "grad_theta" in cap and self.mode.startswith("zo"):
            out["zo/grad_cosine"] = cosine(cap["grad_theta"], self.exact_theta_grad(cap["x"], cap["g"]))
        return out

    # ----------------------------------------------------------------- checkpoint state
    def get_extra_state(self) -> dict:
        return {
            "ledger": self.ledger.state_dict(),
            "device_generators": self.device.generator_states(),
            "zo": self.zo.state_dict() if self.zo is not None else None,
            "integrator": self.integrator.state_dict(),
            "theta_updates": self.theta_updates,
            **self.health.state_dict(),
        }

    def set_extra_state(self, state: dict) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.device.load_generator_states(state["device_generators"])
        if self.zo is not None and state["zo"] is not None:
            self.zo.load_state_dict(state["zo"])
        self.integrator.load_state_dict(state["integrator"])
        self.theta_updates = int(state["theta_updates"])
        self.health.load_state_dict(state)
