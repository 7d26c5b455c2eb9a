"""What a device server serves: :class:`LabDevice`, the one class a lab subclasses for its chip,
and :class:`SimulatedDevice`, which serves any astraora simulator through the same interface.

A lab device is programmed with a setting θ and measured with a batch of rows x (B, n), giving
x A(θ)ᵀ (B, m). The training process owns θ; the server only ever applies the settings it is sent.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from astraora.devices.base import Device
from astraora.rng import make_generator

PURPOSES = ("forward", "zo", "surrogate", "readout")  # the ledger's, sent with every query


@dataclass
class DeviceInfo:
    """What a device reports about itself (the reply to ``open``, docs/PROTOCOL.md).

    Args:
        identity: who answers, e.g. ``"ACME MZI-64 s/n 0042, firmware 1.3"``.
        d_in, d_out: n inputs, m outputs.
        theta_shape: the shape of one setting θ.
        dtype: the dtype of rows, settings and outputs on the wire (``float32`` or ``float64``).
        max_rows: most rows one call may carry (None: no limit of the device's own).
        phase_range: [low, high) of a phase shifter in radians; None for devices without phases.
        phase_resolution: smallest phase step in radians (0: continuous).
        needs_step: the device wants :meth:`LabDevice.step` once per training step (drift).
        phi_from_forward: for ZO with the batch X itself and with the compressed batch GᵀX, whether
            the forward output gives φ(θ) exactly, so the estimator need not query it again (a
            simulator's ``Device.forward_output_gives_phi``).
        nonideal: a simulator's non-idealities (the client checks its ZO step against them).
        jacobian_offsets: for a device with one control per matrix entry (θ of shape (m, n)), the
            column offsets o such that entry [i, j] depends only on θ[i, j + o] ([0]; [-1, 0, 1] with
            crosstalk between row neighbours); None when not declared. ``zo=colored`` needs it.
        stateful: whether the device holds state a checkpoint must restore (random generators, drift):
            a client that loses such a layer (server restarted) stops instead of continuing from a
            rewound state. None: decided by whether :meth:`LabDevice.state` is empty.
    """

    identity: str
    d_in: int
    d_out: int
    theta_shape: tuple[int, ...]
    dtype: str = "float32"
    max_rows: int | None = None
    phase_range: tuple[float, float] | None = (-math.pi, math.pi)
    phase_resolution: float = 0.0
    needs_step: bool = False
    phi_from_forward: tuple[bool, bool] = (True, True)
    nonideal: dict | None = None
    jacobian_offsets: tuple[int, ...] | None = None
    stateful: bool | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["theta_shape"] = list(self.theta_shape)
        out["phi_from_forward"] = list(self.phi_from_forward)
        out["phase_range"] = None if self.phase_range is None else list(self.phase_range)
        out["jacobian_offsets"] = None if self.jacobian_offsets is None else list(self.jacobian_offsets)
        return out


class LabDevice:
    """Subclass this to serve a physical device with ``astraora-device-server``.

    Implement :meth:`info`, :meth:`program` and :meth:`measure`; the rest has defaults. The
    server calls these one at a time (never concurrently), with CPU tensors already checked
    against :meth:`info` (shapes, dtype, row limit). Raise :class:`astraora.errors.DeviceFault`
    for a transient driver error: the client retries it, and stops the run cleanly if it persists.
    A lab device has one fixed shape; the server refuses clients that ask for another.
    """

    def info(self) -> DeviceInfo:
        raise NotImplementedError

    def program(self, theta: Tensor) -> None:
        """Set the phase shifters to θ (``info().theta_shape``)."""
        raise NotImplementedError

    def measure(self, x: Tensor, purpose: str = "forward") -> Tensor:
        """Send rows x (B, n) through the device at the programmed θ and read (B, m).
        ``purpose`` says what the trainer wants the rows for; hardware ignores it."""
        raise NotImplementedError

    def sweep(self, x: Tensor, thetas: Tensor, purpose: str = "forward") -> Tensor:
        """Rows at K settings in turn: thetas (K, *theta_shape), x (B, n) sent at every setting or
        (K, B, n) one batch per setting → (K, B, m). Default: program and measure K times."""
        outputs = []
        for k in range(thetas.shape[0]):
            self.program(thetas[k])
            outputs.append(self.measure(x if x.dim() == 2 else x[k], purpose))
        return torch.stack(outputs)

    def initial_theta(self, seed: int, name: str) -> Tensor:
        """θ a new training run starts from. Default: uniform over the phase range, drawn from
        the run's seed and the layer's name (zeros for a device without phases)."""
        info = self.info()
        dtype = getattr(torch, info.dtype)
        if info.phase_range is None:
            return torch.zeros(info.theta_shape, dtype=dtype)
        low, high = info.phase_range
        u = torch.rand(info.theta_shape, generator=make_generator(seed, name, "init"), dtype=torch.float64)
        return (low + (high - low) * u).to(dtype)

    def track(self, theta: Tensor) -> None:
        """The trainer's current parameter θ (not necessarily the next setting queried). Hardware
        ignores it; a simulator whose non-idealities are relative to it uses it."""

    def step(self) -> None:
        """Once per training step, when ``info().needs_step``."""

    def state(self) -> dict[str, Tensor]:
        """What a training checkpoint must hold to resume this device exactly (random generators)."""
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state`; raise ``ValueError`` for entries that do not fit, before changing anything."""
        if state:
            raise ValueError(f"this device keeps no state, got {sorted(state)}")

    def close(self) -> None:
        """The server is shutting down."""


class SimulatedDevice(LabDevice):
    """An astraora simulator (:class:`astraora.devices.Device`) behind the lab interface, with its
    non-idealities, fault injection and generators living on the server."""

    def __init__(self, device: Device, family: str):
        self.device = device
        self.family = family
        self._takes_purpose = "purpose" in inspect.signature(device.query).parameters

    def info(self) -> DeviceInfo:
        device, nonideal = self.device, self.device.nonideal
        bits = nonideal.phase_bits
        return DeviceInfo(
            identity=(
                f"astraora simulator {self.family} ({type(device).__name__}), layer {device.name!r}, seed {device.seed}"
            ),
            d_in=device.d_in,
            d_out=device.d_out,
            theta_shape=tuple(device.theta.shape),
            dtype=str(device.theta.dtype).removeprefix("torch."),
            phase_range=(-math.pi, math.pi) if device.is_phase_device else None,
            phase_resolution=2 * math.pi / 2**bits if bits else 0.0,
            needs_step=bool(nonideal.drift_std),
            phi_from_forward=self._phi_from_forward(),
            nonideal=asdict(nonideal),
            jacobian_offsets=self.device.jacobian_offsets(),
            stateful=bool(nonideal.output_noise or nonideal.drift_std or device.faults.active),
        )

    def _phi_from_forward(self) -> tuple[bool, bool]:
        check = getattr(self.device, "forward_output_gives_phi", None)
        return (True, True) if check is None else (bool(check(False)), bool(check(True)))

    def program(self, theta: Tensor) -> None:
        self.programmed = theta

    def _query(self, x: Tensor, theta: Tensor, purpose: str) -> Tensor:
        if self._takes_purpose:
            return self.device.query(x, theta, purpose=purpose)
        return self.device.query(x, theta)

    def measure(self, x: Tensor, purpose: str = "forward") -> Tensor:
        return self._query(x, self.programmed, purpose)

    def sweep(self, x: Tensor, thetas: Tensor, purpose: str = "forward") -> Tensor:
        self.programmed = thetas[-1]
        return self._query(x, thetas, purpose)

    def initial_theta(self, seed: int, name: str) -> Tensor:
        return self.device.theta.detach().clone()  # built with the client's seed and name

    @torch.no_grad()
    def track(self, theta: Tensor) -> None:
        self.device.theta.copy_(theta)

    def step(self) -> None:
        self.device.step_drift()

    def state(self) -> dict[str, Tensor]:
        return {**self.device.generator_states(), "drift_offset": self.device.drift.detach().clone()}

    @torch.no_grad()
    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state`, all or nothing: every entry is checked (names, dtypes, shapes,
        finite drift, generator states a generator accepts) before any is set."""
        current = self.state()
        if set(state) != set(current):
            raise ValueError(f"state must hold {sorted(current)}, got {sorted(state)}")
        for key, value in state.items():
            if value.dtype != current[key].dtype or value.shape != current[key].shape:
                raise ValueError(f"state {key!r} must be {current[key].dtype} of shape {list(current[key].shape)}")
        if not bool(torch.isfinite(state["drift_offset"]).all()):
            raise ValueError("state 'drift_offset' must be finite")
        for key in ("noise", "drift", "faults"):
            try:
                torch.Generator().set_state(state[key].clone())  # a scratch generator: nothing changes if it refuses
            except (RuntimeError, ValueError):
                raise ValueError(f"state {key!r} is not a generator state") from None
        self.device.load_generator_states({k: v.clone() for k, v in state.items() if k != "drift_offset"})
        self.device.drift.copy_(state["drift_offset"])
