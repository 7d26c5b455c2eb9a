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
"""

from __future__ import annotations

import io
import json
import math
import time

import torch
from torch import Tensor, nn

from astraora.devices.base import Device, zo_step_problem
from astraora.errors import AstraoraError, ConfigError, DeviceFailure, PeerFailure
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, make_integrator
from astraora.surrogate.lowrank import best_rank_error
from astraora.zo import ColoredEstimator, ZOEstimator, reuses_readout

MODES = ("zo+sm", "exact+sm", "zo+exact", "exact")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a torch.distributed collective (gloo, NCCL) or store operation that
    failed: a peer's connection closed (it stopped) or the operation timed out."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text
        for mark in ("gloo", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL")
    )


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters (it may come from the network)."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RankSync:
    """The collectives a HybridLayer needs under data-parallel training (``torch.distributed``).

    Every process holds the same θ and surrogate; each measures its own shard of the batch. The
    ZO coefficients are averaged (:meth:`mean`, M floats per estimate; colored differences, which
    read whole matrices out, are measured on rank 0 only: see :meth:`HybridLayer._colored_once`,
    2·m·n floats); the surrogate is updated
    on rank 0 only and its factors broadcast (:meth:`broadcast`, (m + n)·r + r² + 1 floats), so
    its queries are made, and counted, once. ``floats`` counts the numbers each collective moved,
    by purpose, for the communication figure.

    Stopping together: a collective that fails because another process stopped (its connections
    closed: killed, crashed, or exited after an error) raises a :class:`PeerFailure` (or a
    DeviceFailure where that process's device failed) instead of gloo's or NCCL's error, and no
    collective runs after that. A process other than rank 0 that stops on an error of its own
    leaves a short JSON note in the process group's store (:meth:`announce`); rank 0, which hosts
    the store and writes summary.json, reads the notes while it waits in a collective, so it stops
    at once and names the cause. Nothing read from the store is unpickled (anyone who can reach
    its port can write there): notes are size-limited JSON, counters are integers. The other
    ranks never read the store, and write their note only after a plain socket found its server
    still there: if rank 0 is gone, so is the store, and a store call would print the C++
    client's error with its stack frames.
    """

    NOTE = "astraora/stop/"  # + rank: the note a process other than rank 0 leaves when it stops
    NOTES = "astraora/stops"  # counter: how many notes were left (one integer to poll)
    NOTE_BYTES = 4096  # notes longer than this are refused unparsed

    def __init__(self, store=None, rank: int | None = None, world_size: int | None = None):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.floats = {"zo": 0, "surrogate": 0, "health": 0, "control": 0}
        # The process group's key-value store: a channel besides the collectives, through which a
        # process that stops tells rank 0 why (rank 0 may be waiting in a collective it never joins).
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.stopped: DeviceFailure | None = None  # why this process stops: no collectives any more

    # ----------------------------------------------------------------- coordinated stop
    def announce(self, error: BaseException) -> None:
        """Tell rank 0 that this process stops because of ``error``, its own failure (not a lost
        peer's), so that rank 0 stops at once and names it. Rank 0 itself leaves no note: the
        others learn that it stopped from their collectives failing when it exits."""
        if self.stopped is None:
            self.stopped = PeerFailure(f"this process stopped: {_one_line(error)}")
        if self.rank == 0 or not self._store_reachable():
            return
        kind = "device_failure" if isinstance(error, DeviceFailure) else "error"
        message = _one_line(str(error) if isinstance(error, AstraoraError) else f"{type(error).__name__}: {error}")
        try:
            self.store.set(f"{self.NOTE}{self.rank}", json.dumps({"kind": kind, "message": message}))
            self.store.add(self.NOTES, 1)
        except Exception:  # noqa: BLE001 - rank 0 went away meanwhile: nobody is left to tell
            pass

    def _store_reachable(self) -> bool:
        """Whether the store's server (in rank 0) still accepts connections, checked with a plain
        socket so that a gone server prints nothing (a store call would print a C++ trace)."""
        import socket

        store = self.store
        while hasattr(store, "underlying_store"):
            store = store.underlying_store
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        if not host or not port:
            return True  # an in-process or file store (tests)
        try:
            socket.create_connection((host, int(port)), timeout=2.0).close()
        except OSError:
            return False
        return True

    def notes(self) -> dict[int, dict]:
        """The notes left by the processes that stopped on an error of their own, by rank: each
        ``{"kind": "device_failure" | "error", "message": one line}``. Read on rank 0 only."""
        if self.rank != 0 or not self.store.add(self.NOTES, 0):
            return {}
        found = {}
        for rank in range(1, self.world_size):
            key = f"{self.NOTE}{rank}"
            if self.store.check([key]):
                found[rank] = self.parse_note(self.store.get(key))
        return found

    @classmethod
    def parse_note(cls, raw: bytes) -> dict:
        """A note as read from the store, checked: size-limited JSON with a known kind and a
        message shown as one printable line; anything else is reported as unreadable, never run."""
        note = None
        if len(raw) <= cls.NOTE_BYTES:
            try:
                note = json.loads(bytes(raw).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                note = None
        if (
            not isinstance(note, dict)
            or note.get("kind") not in ("device_failure", "error")
            or not isinstance(note.get("message"), str)
        ):
            return {"kind": "error", "message": "its note in the process group's store was unreadable"}
        return {"kind": note["kind"], "message": _one_line(note["message"])}

    def stop_error(self) -> DeviceFailure:
        """Why this process stops now that a collective failed or another process left a note: a
        DeviceFailure naming the process whose device failed, else a :class:`PeerFailure`."""
        if self.stopped is not None:
            return self.stopped
        notes = self.notes() if self.rank == 0 else {}
        if notes:
            rank, note = min(notes.items())
            kind = DeviceFailure if note["kind"] == "device_failure" else PeerFailure
            error = kind(f"data-parallel process {rank} stopped ({note['message']}); this process stops too.")
        elif self.rank == 0:
            who = "process 1" if self.world_size == 2 else "another process"
            error = PeerFailure(f"data-parallel {who} stopped (killed or crashed); this process stops too.")
        else:
            who = "process 0" if self.world_size == 2 else "another process"
            error = PeerFailure(
                f"data-parallel {who} stopped (killed, crashed or failed: see its output); this process stops too."
            )
        self.stopped = error
        return error

    def _wait(self, work) -> None:
        """Wait for a collective. If it fails (a process stopped: its connections closed) or, on
        rank 0, another process left a note meanwhile (it will never join), stop this process with
        :meth:`stop_error` instead of gloo's error or a hang until the process-group timeout."""
        spins, next_check = 0, 0.0
        while not work.is_completed():
            now = time.monotonic()
            if self.rank == 0 and now >= next_check:
                if self.store.add(self.NOTES, 0):
                    raise self.stop_error()
                next_check = now + 0.01
            spins += 1
            time.sleep(0 if spins < 100 else 2e-4)
        try:
            work.wait()
        except RuntimeError as err:  # gloo, NCCL (DistBackendError is a RuntimeError)
            raise self.stop_error() from err

    def _start(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def check(self) -> None:
        """A one-float collective that every process passes together, or leaves with a
        DeviceFailure when another stopped (before a collective that cannot be watched)."""
        self._reduce(torch.zeros(1), "control")

    def gather_object(self, obj) -> list | None:
        """``obj`` of every process, by rank, on rank 0 (None elsewhere). Sent as ``torch.save``
        bytes and read back with ``torch.load(weights_only=True)``: tensors, numbers, strings and
        containers only, so nothing a peer sends can run code here (torch's all_gather_object
        unpickles)."""
        self._start()
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        device = self._collective_device()
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
        sizes = self._all_gather(torch.tensor([payload.numel()], dtype=torch.int64, device=device))
        padded = torch.zeros(int(max(int(n) for n in sizes)), dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        parts = self._all_gather(padded)
        if self.rank != 0:
            return None
        return [self.decode(part[: int(n)], rank) for rank, (part, n) in enumerate(zip(parts, sizes, strict=True))]

    @staticmethod
    def decode(data: Tensor, rank: int = 0):
        """What :meth:`gather_object` sent, from its bytes; refuses anything but plain data."""
        try:
            return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch's weights-only unpickler refuses other objects
            raise PeerFailure(
                f"data-parallel process {rank} sent a checkpoint state that is not plain tensors "
                f"and numbers ({_one_line(err, 200)}); this process stops."
            ) from None

    def _collective_device(self) -> torch.device:
        """Where the backend's collectives take tensors (NCCL: this process's GPU)."""
        if self._dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._wait(self._dist.all_gather(out, t, async_op=True))
        return out

    # ----------------------------------------------------------------- collectives
    def _reduce(self, t: Tensor, purpose: str) -> Tensor:
        self._start()
        self.floats[purpose] = self.floats.get(purpose, 0) + t.numel()
        t = t.contiguous()
        self._wait(self._dist.all_reduce(t, async_op=True))
        return t

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over the processes (the ZO estimator's reducer)."""
        return self._reduce(t.clone(), "zo") / self.world_size

    def sum(self, t: Tensor, purpose: str = "health") -> Tensor:
        return self._reduce(t.clone(), purpose)

    def broadcast(self, t: Tensor, purpose: str = "surrogate") -> Tensor:
        """``t`` as rank 0 holds it, on every process."""
        self._start()
        self.floats[purpose] = self.floats.get(purpose, 0) + t.numel()
        t = t.contiguous()
        self._wait(self._dist.broadcast(t, src=0, async_op=True))
        return t


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item())


@torch.no_grad()
def batch_view(x: Tensor, y: Tensor, y_hat: Tensor, rank: int, rcond: float = 0.1) -> tuple[Tensor, Tensor] | None:
    """The surrogate's error and the best rank-r error, squared, on the inputs a batch spans, from
    the batch's inputs X (B, n), readings Y = X Aᵀ and the surrogate's outputs Ŷ = X Âᵀ. With
    X = U S Vᵀ (singular values above ``rcond`` × the largest: dividing by S amplifies the readings'
    noise, at most 1/rcond times), A V = Yᵀ U S⁻¹ exactly, so
    e² = ‖S⁻¹ Uᵀ (Y − Ŷ)‖² = ‖(Â − A) V‖² and b² = the squared singular values of A V beyond the
    r-th need no query. Where the batch spans every input (B ≥ n, all of X's singular values kept) they
    are the errors in the Frobenius norm; else those of A restricted to the batch's input subspace, which the
    batch's own conditioning (trained features are far from isotropic) does not weigh. U and S come
    from the smaller Gram matrix (X Xᵀ, or Xᵀ X with U S⁻¹ = X V S⁻², so Uᵀ M = S⁻¹ Vᵀ Xᵀ M).
    None where the batch cannot tell: it spans r or fewer inputs, the layer has r or fewer outputs,
    or A V has rank ≤ r to rounding."""
    rounding = 100 * torch.finfo(y.dtype).eps / rcond  # the readings' rounding, through S⁻¹
    x, y, residual = x.double(), y.double(), (y - y_hat).double()
    rows, n = x.shape
    if rows <= n:
        lam, basis = torch.linalg.eigh(x @ x.T)
        left_y, left_r = basis.T @ y, basis.T @ residual  # Uᵀ Y, Uᵀ R
        power = 0.5
    else:
        lam, basis = torch.linalg.eigh(x.T @ x)
        left_y, left_r = basis.T @ (x.T @ y), basis.T @ (x.T @ residual)  # Vᵀ Xᵀ Y = S Uᵀ Y
        power = 1.0
    if lam.numel() == 0 or not lam[-1] > 0:
        return None
    keep = lam > (rcond**2) * lam[-1]  # s > rcond · s_max
    if int(keep.sum()) <= rank or y.shape[1] <= rank:
        return None
    scale = lam[keep].pow(-power).unsqueeze(1)  # S⁻¹ (rows ≤ n) or S⁻² (rows > n)
    seen = scale * left_y[keep]  # (A V)ᵀ: (k, m)
    error = (scale * left_r[keep]).square().sum()
    tail = torch.linalg.svdvals(seen)[rank:].square().sum()
    if not tail > rounding**2 * seen.square().sum():
        return None
    return error, tail


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
            triggers a full readout rebuild of the surrogate (counted as ``readout``).
        health_growth: if set, a full readout when the surrogate's error over the best rank-r
            error, both on the inputs the last few training batches span (:func:`batch_view`),
            exceeds (1 + health_growth) times that ratio first measured after the last full
            readout (right after a readout the surrogate is the best rank-r one, so this bounds how
            far an integrator that only approximates the update, such as psi_implicit, may drift,
            also while the device's own best rank-r error changes). Free in queries: both come
            from the forward pass's own inputs and readings.
        max_retries, timeout_s: the ledger's fault handling.
        seed, name: the run seed and this layer's stable name (seed its generators).
    """

    # batches per health_growth ratio: sums over a few batches move less with the inputs one batch
    # happens to span (with fewer rows than inputs, each batch sees A on another subspace)
    HEALTH_WINDOW = 3

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
        self.health_threshold = health_threshold
        if health_growth is not None and not health_growth > 0:
            raise ConfigError(f"surrogate.health_growth={health_growth} must be > 0 (or null: off).")
        self.health_growth = health_growth
        self.reference_residual: float | None = None  # the health ratio of the first window after the last readout
        self.reference_kind: str | None = None  # "view": batch_view's ratio; "plain": ‖Y − X Âᵀ‖/‖Y‖
        self.health_window: list[list[float]] = []  # [numerator², denominator²] of the last HEALTH_WINDOW batches
        self.health_plain_run = 0  # plain batches in a row while the reference is a view
        self.health_rebuilds = 0  # full readouts triggered by the health checks
        self.theta_updates = 0
        self.capture_next_backward = False  # set by the trainer when it wants gradient cosines
        self.measure_residual = True  # the trainer clears it on steps that log no residual
        self._captured: dict[str, Tensor] = {}
        self.last_residual: float | None = None
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
        if (
            self.training
            and self.uses_surrogate
            and (self.measure_residual or self.health_threshold is not None or self.health_growth is not None)
        ):
            self._check_health(x2.detach(), y.detach())
        if self.scale is not None:
            y = self.scale * y
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.d_out)

    @torch.no_grad()
    def _check_health(self, x: Tensor, y: Tensor) -> None:
        """Residual of the surrogate on this batch, from queries already made (no extra cost)."""
        y_hat = self.surrogate.apply(x)
        residual = (y - y_hat).square().sum().double()
        growth = self.health_growth is not None and self._window_can_fill()
        view = batch_view(x, y, y_hat, self.surrogate.rank) if growth else None
        zero = residual.new_zeros(())  # on y's device, as the collective needs
        # [residual², ‖Y‖², error², best rank-r error², 1 where this process has a view]
        sq = torch.stack(
            [
                residual,
                y.square().sum().double(),
                *(view if view is not None else (zero, zero)),
                residual.new_tensor(float(view is not None)),
            ]
        )
        if self.sync is not None:  # the whole batch's, so that every process takes the same decision
            sq = self.sync.sum(sq)
        everywhere = self.sync is None or int(sq[4]) == self.sync.world_size
        self.last_residual = float(sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-12))
        if self.health_threshold is not None and self.last_residual > self.health_threshold:
            self.health_rebuilds += 1
            self._read_out()
        elif growth:
            self._check_growth("view" if bool(sq[4]) and everywhere else "plain", sq)

    def _window_can_fill(self) -> bool:
        """Whether this batch can still count: the window fills before the integrator's next full
        readout empties it (never where every θ-update is a readout, ``rebuild``: then the batch's
        view is not computed). The same on every process (a function of the shared step)."""
        for k in range(1, self.HEALTH_WINDOW + 1):
            if self.integrator.reads_out(self.theta_updates + k):
                return len(self.health_window) + k >= self.HEALTH_WINDOW
        return True

    def _check_growth(self, kind: str, sq: Tensor) -> None:
        """``health_growth``: the ratio over the last :attr:`HEALTH_WINDOW` batches (sums of squares,
        so one batch's luck moves it less) against the ratio of the first such window after the
        last readout. ``kind``: "view", the surrogate's error over the best rank-r error on the
        batch's inputs (:func:`batch_view`), or "plain", the residual over ‖Y‖, where a batch
        cannot tell."""
        if kind != self.reference_kind:
            self.health_plain_run = self.health_plain_run + 1 if kind == "plain" else 0
            if self.reference_kind == "view" and self.health_plain_run < self.HEALTH_WINDOW:
                return  # a batch that cannot be compared with the window (a short last batch)
            # batches can no longer tell (or can again): start over with this kind
            self.health_window, self.reference_residual, self.reference_kind = [], None, kind
        self.health_plain_run = 0
        pair = [float(sq[2]), float(sq[3])] if kind == "view" else [float(sq[0]), float(sq[1])]
        self.health_window = [*self.health_window, pair]
        self.health_window = self.health_window[-self.HEALTH_WINDOW :]
        if len(self.health_window) < self.HEALTH_WINDOW:
            return
        ratio = math.sqrt(sum(r for r, _ in self.health_window) / max(sum(f for _, f in self.health_window), 1e-300))
        if self.reference_residual is None:
            self.reference_residual = ratio
        elif ratio > (1 + self.health_growth) * self.reference_residual:
            self.health_rebuilds += 1
            self._read_out()

    def _read_out(self) -> None:
        """A full readout of the surrogate (on rank 0, then broadcast); the next residual measured
        becomes the reference of ``health_growth``."""
        self._on_rank0_then_broadcast(lambda: self.surrogate.readout(self.ledger))
        self._reset_health_reference()

    def _reset_health_reference(self) -> None:
        """After a full readout: ``health_growth`` measures its reference again."""
        self.reference_residual = self.reference_kind = None
        self.health_window, self.health_plain_run = [], 0

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
                self._reset_health_reference()
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
            out["surrogate/grad_cosine"] = _cosine(cap["grad_x"], cap["g"] @ a)
        if "grad_theta" in cap and self.mode.startswith("zo"):
            out["zo/grad_cosine"] = _cosine(cap["grad_theta"], self.exact_theta_grad(cap["x"], cap["g"]))
        return out

    # ----------------------------------------------------------------- checkpoint state
    def get_extra_state(self) -> dict:
        return {
            "ledger": self.ledger.state_dict(),
            "device_generators": self.device.generator_states(),
            "zo": self.zo.state_dict() if self.zo is not None else None,
            "integrator": self.integrator.state_dict(),
            "theta_updates": self.theta_updates,
            "reference_residual": self.reference_residual,
            "reference_kind": self.reference_kind,
            "health_window": self.health_window,
            "health_plain_run": self.health_plain_run,
            "health_rebuilds": self.health_rebuilds,
        }

    def set_extra_state(self, state: dict) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.device.load_generator_states(state["device_generators"])
        if self.zo is not None and state["zo"] is not None:
            self.zo.load_state_dict(state["zo"])
        self.integrator.load_state_dict(state["integrator"])
        self.theta_updates = int(state["theta_updates"])
        self.reference_residual = state.get("reference_residual")  # absent in older checkpoints
        # older checkpoints held a plain residual: a later batch with a view takes a new reference
        self.reference_kind = state.get("reference_kind", None if self.reference_residual is None else "plain")
        self.health_window = [list(pair) for pair in state.get("health_window", [])]
        self.health_plain_run = int(state.get("health_plain_run", 0))
        self.health_rebuilds = int(state.get("health_rebuilds", 0))
