"""The black-box device base class and the non-idealities every device shares.

A device is a linear map ``y = A(θ) x`` whose matrix depends on control parameters θ.
Subclasses give three things: the shape of θ, its initialisation and the ideal transfer
function ``transfer(theta, x)``. This base class adds what real hardware does on top:

* relative output noise ``y ← y + ε·|y|·N(0, 1)``;
* phase quantization of θ to ``phase_bits`` on [−π, π) (straight-through on the oracle path);
* input quantization of x to ``input_bits`` (a DAC with the batch's dynamic range);
* slow drift: a random walk added to θ once per training step, unseen by the trainer;
* thermal crosstalk: an effective θ' = θ + c·(sum of neighbouring phase shifters);
* fault injection: a query that raises, returns NaN/Inf, or is slow.

Which queries see the non-idealities is ``nonideal.queries``:

* ``all``: every query (forward, ZO, surrogate, readout), as real hardware does. A ZO step μ
  below half the phase resolution 2π/2^bits then measures nothing (every θ + μu rounds back to
  θ), so such a configuration is refused (:func:`astraora.zo.validation.zo_step_problem`).
* ``forward``: the paper's simulation. The forward pass sees noise, quantization, drift,
  crosstalk and input quantization; every other query sees the ideal device (no output noise,
  no input quantization) at the quantized setting:

  - ``zo`` queries at θ' are answered at ``effective_theta(θ) + (θ' − θ)``, θ the live
    parameter: the perturbation μu is added continuously to the setting the forward pass used
    (drift, crosstalk and quantization of θ included), i.e. a straight-through ZO estimate of the
    ideal device's gradient at the forward's operating point;
  - ``surrogate`` and ``readout`` queries at θ' are answered at ``effective_theta(θ')`` (the
    quantized setting, noise-free), so the surrogate tracks the matrix the forward pass applies.

  Fault injection (a driver property, not a non-ideality) applies to every query in both modes.

Two access paths exist and they are kept apart on purpose:

* :meth:`query` is the hardware: no gradient, noise and faults applied, batched over several
  settings of θ. Training code calls it only through :class:`astraora.ledger.QueryLedger`.
* :meth:`simulate` / :meth:`matrix` are the differentiable simulator, used only by oracle
  gradient modes and diagnostics (the ledger counts them as ``oracle``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from astraora.errors import ConfigError, DeviceFault
from astraora.rng import make_generator

QUERY_SCOPES = ("all", "forward")


@dataclass
class NonIdealities:
    """Physical imperfections; all off by default."""

    output_noise: float = 0.0  # ε, relative output noise
    phase_bits: int = 0  # 0 = continuous phases
    input_bits: int = 0  # 0 = continuous inputs
    drift_std: float = 0.0  # std of the per-step random walk of θ (radians)
    crosstalk: float = 0.0  # c in θ' = θ + c·(neighbours)
    queries: str = "all"  # which queries see the above: "all" (hardware) or "forward" (the paper's simulation)

    def __post_init__(self) -> None:
        if self.queries not in QUERY_SCOPES:
            raise ConfigError(
                f"device.nonideal.queries={self.queries!r} is not allowed; choose one of {list(QUERY_SCOPES)}."
            )
        for key in ("output_noise", "drift_std"):
            if getattr(self, key) < 0:
                raise ConfigError(f"device.nonideal.{key}={getattr(self, key)} must be >= 0.")
        for key in ("phase_bits", "input_bits"):
            value = getattr(self, key)
            if value < 0 or value == 1 or value > 24:
                raise ConfigError(f"device.nonideal.{key}={value} must be 0 (off) or 2..24 bits.")


@dataclass
class Faults:
    """Fault injection, to test how training survives a misbehaving driver; off by default."""

    raise_prob: float = 0.0  # probability that a query raises DeviceFault
    nonfinite_prob: float = 0.0  # probability that a query returns NaN/Inf entries
    slow_prob: float = 0.0  # probability that a query takes `slow_seconds` longer
    slow_seconds: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (f.name.endswith("_prob") and value > 1):
                raise ConfigError(
                    f"device.faults.{f.name}={value} must be in [0, 1] for probabilities and >= 0 otherwise."
                )

    @property
    def active(self) -> bool:
        return self.raise_prob > 0 or self.nonfinite_prob > 0 or self.slow_prob > 0


def _as_dataclass(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    value = dict(value)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(allowed)}.")
    return cls(**value)


def wrap_phase(theta: Tensor) -> Tensor:
    """Map phases to [−π, π)."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def quantize_phase(theta: Tensor, bits: int) -> Tensor:
    """Round phases to 2**bits levels on [−π, π); straight-through gradient."""
    step = 2 * math.pi / 2**bits
    levels = torch.round((wrap_phase(theta) + math.pi) / step)
    quantized = torch.remainder(levels, 2**bits) * step - math.pi
    return theta + (quantized - theta).detach()


def quantize_input(x: Tensor, bits: int) -> Tensor:
    """Symmetric uniform quantization of x with the batch's dynamic range (a DAC)."""
    scale = x.abs().amax().clamp_min(1e-12) / (2 ** (bits - 1) - 1)
    return x + (torch.round(x / scale) * scale - x).detach()


class Device(nn.Module):
    """A programmable linear black box ``y = A(θ) x`` with x ∈ R^n, y ∈ R^m.

    Args:
        d_in: n, the input width.
        d_out: m, the output width.
        nonideal: :class:`NonIdealities` or a mapping of its fields.
        faults: :class:`Faults` or a mapping of its fields.
        seed: the run seed; with ``name`` it seeds the device's own generators.
        name: a stable name for this device inside the network (e.g. ``"head.physical"``).

    Subclasses set ``is_phase_device`` and implement :meth:`theta_shape`, :meth:`init_theta` and
    :meth:`transfer`. θ is the ``nn.Parameter`` ``self.theta``; the training loop owns it.
    """

    is_phase_device: bool = True
    has_simulator: bool = True

    def __init__(self, d_in: int, d_out: int, *, nonideal=None, faults=None, seed: int = 0, name: str = "device"):
        super().__init__()
        if int(d_in) < 1 or int(d_out) < 1:
            raise ConfigError(f"device dimensions must be positive, got d_in={d_in}, d_out={d_out}.")
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.nonideal = _as_dataclass(NonIdealities, nonideal)
        self.faults = _as_dataclass(Faults, faults)
        if self.nonideal.phase_bits and not self.is_phase_device:
            raise ConfigError(f"device.nonideal.phase_bits applies to phase devices only, not {type(self).__name__}.")
        self.name = name
        self.seed = int(seed)
        init_gen = make_generator(seed, name, "init")
        self.theta = nn.Parameter(self.init_theta(init_gen).to(torch.get_default_dtype()))
        self.register_buffer("drift", torch.zeros_like(self.theta.data))
        self.noise_gen = make_generator(seed, name, "noise")
        self.drift_gen = make_generator(seed, name, "drift")
        self.fault_gen = make_generator(seed, name, "faults")

    # ----------------------------------------------------------------- to implement
    def theta_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def init_theta(self, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def transfer(self, theta: Tensor, x: Tensor) -> Tensor:
        """Ideal, differentiable transfer for a batch of settings.

        Args:
            theta: (K, *theta_shape) effective parameters.
            x: (B, n) shared by all settings, or (K, B, n).
        Returns:
            (K, B, m) outputs ``x A(θ_k)ᵀ``.
        """
        raise NotImplementedError

    def jacobian_offsets(self) -> tuple[int, ...] | None:
        """The column offsets o such that entry A[i, j] depends only on θ[i, j + o]: the declared
        sparsity of ∂A/∂θ that colored finite differences (``zo=colored``) rely on. None (the
        default): a dense or unknown Jacobian, as in a mesh, where every phase moves many entries."""
        return None

    def neighbour_sum(self, theta: Tensor) -> Tensor:
        """Sum of the physically neighbouring phase shifters of each entry of θ (K, *theta_shape).

        Default: neighbours along the last axis (adjacent elements in a row of a 2-D bank).
        """
        total = torch.zeros_like(theta)
        total[..., 1:] += theta[..., :-1]
        total[..., :-1] += theta[..., 1:]
        return total

    # ----------------------------------------------------------------- shared physics
    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def extra_repr(self) -> str:
        active = {k: v for k, v in asdict(self.nonideal).items() if v}
        return f"d_in={self.d_in}, d_out={self.d_out}, p={self.num_params}" + (f", nonideal={active}" if active else "")

    def effective_theta(self, theta: Tensor) -> Tensor:
        """θ as the hardware realises it: drift, crosstalk, then quantization. theta: (K, *shape)."""
        theta = theta + self.drift
        if self.nonideal.crosstalk:
            theta = theta + self.nonideal.crosstalk * self.neighbour_sum(theta)
        if self.nonideal.phase_bits:
            theta = quantize_phase(theta, self.nonideal.phase_bits)
        return theta

    def _settings(self, theta: Tensor | None) -> tuple[Tensor, bool]:
        theta = self.theta if theta is None else theta
        single = theta.dim() == len(self.theta_shape())
        return (theta.unsqueeze(0) if single else theta), single

    def simulate(self, x: Tensor, theta: Tensor | None = None) -> Tensor:
        """Differentiable simulator (oracle path): no noise, no faults. x: (B, n) → (B, m),
        or (K, B, m) when theta holds K settings."""
        thetas, single = self._settings(theta)
        y = self.transfer(self.effective_theta(thetas), x)
        return y[0] if single else y

    def matrix(self, theta: Tensor | None = None) -> Tensor:
        """The true A(θ), (m, n); differentiable. Oracle only."""
        eye = torch.eye(self.d_in, dtype=self.theta.dtype, device=self.theta.device)
        return self.simulate(eye, theta).transpose(-1, -2)

    def sees_nonidealities(self, purpose: str) -> bool:
        """Whether a query made for ``purpose`` (a ledger purpose) sees the non-idealities."""
        return self.nonideal.queries == "all" or purpose == "forward"

    def supports_drawn_queries(self, purpose: str = "zo") -> bool:
        """Whether the device answers *drawn* queries for ``purpose``: the K settings θ + step·u_d with
        Gaussian directions u_d generated on the device from a seed (no K × p settings tensor sent),
        read as K inner products with given weights (``query_drawn``, ``drawn_directions`` and
        ``combine_drawn``; :meth:`~astraora.ledger.QueryLedger.query_drawn`), and answered exactly as
        :meth:`query` would answer those settings, non-idealities included. False (the default):
        callers send explicit settings."""
        return False

    def forward_output_gives_phi(self, compressed: bool) -> bool:
        """Whether φ(θ) = Σ_b ⟨y_b, g_b⟩ from the forward output is exactly what the ZO queries
        at θ would measure, so that re-querying it can be skipped.

        Not when the ZO queries see another device than the forward pass (``queries=forward``
        with output noise or input quantization), nor when they send other rows through a
        nonlinear or noisy read (the compressed batch C = GᵀX instead of X, with output noise or
        input quantization: C is quantized with its own range, its noise differs from X's)."""
        if not (self.nonideal.output_noise or self.nonideal.input_bits):
            return True
        return self.nonideal.queries == "all" and not compressed

    def settings_for(self, theta: Tensor, purpose: str) -> Tensor:
        """The effective settings (K, *theta_shape) a query for ``purpose`` is answered at."""
        if self.sees_nonidealities(purpose) or purpose != "zo":
            return self.effective_theta(theta)
        live = self.theta.detach()
        return self.effective_theta(live.unsqueeze(0)) + (theta - live)

    @torch.no_grad()
    def query(self, x: Tensor, theta: Tensor | None = None, *, purpose: str = "forward") -> Tensor:
        """The hardware: send rows x (B, n), read x A(θ)ᵀ (B, m) with noise and faults.

        ``theta`` may hold K settings (K, *theta_shape); the result is then (K, B, m).
        ``purpose`` (the ledger's) decides which non-idealities the query sees
        (``nonideal.queries``, module docstring). Do not call this directly from training code:
        go through the ledger.
        """
        if self.faults.active:
            self._inject_delay_or_raise()
        noisy = self.sees_nonidealities(purpose)
        if noisy and self.nonideal.input_bits:
            x = quantize_input(x, self.nonideal.input_bits)
        thetas, single = self._settings(theta)
        y = self.transfer(self.settings_for(thetas, purpose), x)
        y = y[0] if single else y
        if noisy and self.nonideal.output_noise:
            noise = torch.randn(y.shape, generator=self.noise_gen, dtype=y.dtype, device="cpu").to(y.device)
            y = y + self.nonideal.output_noise * y.abs() * noise
        return self._inject_nonfinite(y)

    def _inject_nonfinite(self, y: Tensor) -> Tensor:
        """``y``, or with probability ``faults.nonfinite_prob`` a copy whose first reading is NaN (one
        draw of the fault generator per call)."""
        if self.faults.nonfinite_prob and self._draw() < self.faults.nonfinite_prob and y.numel():
            y = y.clone()
            y[(0,) * y.dim()] = float("nan")
        return y

    @property
    def drifts(self) -> bool:
        """Whether the device drifts between training steps (declared, like a chip's datasheet: the
        trainer drops readings taken before a drift step; it never looks at the drift itself)."""
        return bool(self.nonideal.drift_std)

    @torch.no_grad()
    def step_drift(self) -> None:
        """Advance the drift random walk by one training step."""
        if self.nonideal.drift_std:
            noise = torch.randn(self.drift.shape, generator=self.drift_gen, dtype=self.drift.dtype)
            self.drift.add_(self.nonideal.drift_std * noise.to(self.drift.device))

    def _draw(self) -> float:
        return float(torch.rand((), generator=self.fault_gen))

    def _inject_delay_or_raise(self) -> None:
        if self.faults.slow_prob and self._draw() < self.faults.slow_prob:
            time.sleep(self.faults.slow_seconds)
        if self.faults.raise_prob and self._draw() < self.faults.raise_prob:
            raise DeviceFault(f"injected fault: query to device {self.name!r} failed")

    # ----------------------------------------------------------------- state
    def generator_states(self) -> dict[str, Tensor]:
        return {
            "noise": self.noise_gen.get_state(),
            "drift": self.drift_gen.get_state(),
            "faults": self.fault_gen.get_state(),
        }

    def load_generator_states(self, states: dict[str, Tensor]) -> None:
        self.noise_gen.set_state(states["noise"])
        self.drift_gen.set_state(states["drift"])
        self.fault_gen.set_state(states["faults"])


def dense_transfer(weights: Tensor, x: Tensor) -> Tensor:
    """x A_kᵀ for a batch of dense matrices A (K, m, n) and x (B, n) or (K, B, n) → (K, B, m)."""
    if x.dim() == 2:
        return torch.einsum("bn,kmn->kbm", x, weights)
    return torch.bmm(x, weights.transpose(1, 2))
