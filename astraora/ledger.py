"""The query ledger: the one door to a physical device.

Every access to a device goes through a :class:`QueryLedger`, which counts it by purpose:

* ``forward``   rows sent by the forward pass (training and evaluation);
* ``zo``        rows sent at perturbed settings by the zeroth-order estimator;
* ``surrogate`` rows sent by the surrogate integrator (queries at θ₀ and θ₁, sketches);
* ``readout``   rows sent to read the whole matrix out (initialisation, rebuilds).

``oracle`` counts simulator evaluations (true matrix, exact gradients) used by oracle gradient
modes and diagnostics; they are not hardware queries and never enter ``total``.

A *reprogram* is counted whenever a query needs the hardware at a setting other than the one it
holds: the ledger remembers the last programmed θ and compares. A batch of K perturbed settings
costs K reprograms, whether the settings are sent (``query_settings``) or drawn on the device from
a seed (``query_drawn``, ``device.engine=fused``). Queries that raise or return non-finite values are retried up to
``max_retries`` times (counted in ``retries``); when they keep failing :class:`DeviceFailure`
is raised so the run can checkpoint and stop.

``wait_seconds`` is the wall time spent inside the device's ``query`` (all attempts): what a slow
chip or a network hop costs. It is always checkpointed, but logged only for devices served over
the network (``device.is_remote``): in-process it is compute time, and logging it would make the
logs of two otherwise identical runs differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from astraora.devices.base import Device
from astraora.errors import ConfigError, DeviceFailure, DeviceFault

PURPOSES = ("forward", "zo", "surrogate", "readout")


class QueryLedger:
    """Counts queries and reprograms of one device by purpose, retries failed queries.

    Args:
        device: the black box.
        max_retries: extra attempts for a query that raised, returned NaN/Inf or timed out.
        timeout_s: a query slower than this counts as failed (None: no limit).
    """

    def __init__(
        self, device: Device, *, max_retries: int = 3, timeout_s: float | None = None, keep_readings: bool = False
    ):
        self.device = device
        self.max_retries = int(max_retries)
        self.timeout_s = timeout_s
        self.queries = {p: 0 for p in PURPOSES}
        self.reprograms = {p: 0 for p in PURPOSES}
        self.oracle = 0
        self.retries = 0
        self.skipped = {"zo": 0, "surrogate": 0}
        self.wait_seconds = 0.0
        self._programmed: Tensor | None = None  # the θ the hardware holds now
        self.drift_steps = 0  # drift steps of a device that drifts: a reading from an earlier one is stale
        self.keep_readings = bool(keep_readings)  # keep the last full readout for reading_at (an m × n matrix)
        self._reading: dict | None = None  # the last full readout: {"theta", "drift_steps", "noisy", "matrix"}

    # ----------------------------------------------------------------- totals
    @property
    def total(self) -> int:
        return sum(self.queries.values())

    @property
    def total_reprograms(self) -> int:
        return sum(self.reprograms.values())

    def counts(self) -> dict[str, int | float]:
        """Flat counters, as logged: ``queries/<purpose>``, ``queries/total``, ``reprograms``..."""
        return self.counts_of(vars(self), remote=getattr(self.device, "is_remote", False))

    @staticmethod
    def counts_of(state: dict, remote: bool = False) -> dict[str, int | float]:
        """:meth:`counts` of a ledger's counters (its attributes, or its :meth:`state_dict`)."""
        out = {f"queries/{p}": n for p, n in state["queries"].items()}
        out["queries/total"] = sum(state["queries"].values())
        out["queries/oracle"] = state["oracle"]
        out["reprograms"] = sum(state["reprograms"].values())
        out["queries/retries"] = state["retries"]
        out["skipped/zo"] = state["skipped"]["zo"]
        out["skipped/surrogate"] = state["skipped"]["surrogate"]
        if remote:
            out["device/wait_seconds"] = state["wait_seconds"]
        return out

    # ----------------------------------------------------------------- hardware access
    def query(self, x: Tensor, purpose: str, theta: Tensor | None = None) -> Tensor:
        """Program θ (the live parameter when None) if needed, send rows x (..., n), read (..., m)."""
        self._check_purpose(purpose)
        commanded = (self.device.theta if theta is None else theta).detach()
        rows = x.reshape(-1, self.device.d_in)
        if self._programmed is None or not torch.equal(commanded, self._programmed):
            self.reprograms[purpose] += 1
            self._programmed = commanded.clone()
        y = self._send(rows, commanded, purpose)
        self.queries[purpose] += rows.shape[0]
        return y.reshape(*x.shape[:-1], self.device.d_out)

    def query_settings(
        self, x: Tensor, thetas: Tensor, purpose: str, *, check: bool = True, first_may_match: bool = False
    ) -> Tensor:
        """Query K settings in turn (e.g. ZO perturbations): thetas (K, *theta_shape),
        x (B, n) sent at every setting or (K, B, n) one batch per setting → (K, B, m).

        Costs K reprograms (K − 1 when ``first_may_match`` and the hardware already holds the
        first setting) and K·B queries; executed as one batched simulation. ``check=False`` skips
        the test for non-finite readings (a host synchronisation on a GPU): the caller then
        checks, and repeats the work with checks if needed."""
        self._check_purpose(purpose)
        k = thetas.shape[0]
        rows_per_setting = x.shape[-2]
        held = first_may_match and self._programmed is not None and torch.equal(thetas[0].detach(), self._programmed)
        y = self._send(x, thetas.detach(), purpose, check=check)
        self.reprograms[purpose] += k - int(held)
        self.queries[purpose] += k * rows_per_setting
        self._programmed = thetas[-1].detach().clone()
        return y

    def drawn_queries(self, purpose: str) -> bool:
        """Whether the device answers drawn queries for ``purpose`` exactly as the explicit settings
        (:meth:`Device.supports_drawn_queries <astraora.devices.base.Device.supports_drawn_queries>`;
        a device that does not say: no)."""
        says = getattr(self.device, "supports_drawn_queries", None)
        return bool(says(purpose)) if says is not None else False

    def query_drawn(
        self,
        probes: Tensor,
        weights: Tensor,
        seed: int,
        first_index: int,
        count: int,
        step: float,
        purpose: str,
        *,
        check: bool = True,
    ) -> Tensor:
        """The inner products Σ_b ⟨y_b, w_b⟩ (count,) of the rows ``probes`` (B, n) read at the settings
        θ + step·u_d (θ the live parameter) for the drawn directions d = first_index, …,
        first_index + count − 1 of ``seed``, generated on the device (no K × p settings tensor), with
        ``weights`` (B, m). Counted as :meth:`query_settings` counts those settings: ``count``
        reprograms and count·B queries, and the hardware holds the last setting afterwards;
        retried and (``check``) checked for non-finite values the same way. Only where
        :meth:`drawn_queries` (else ConfigError: send explicit settings)."""
        self._check_purpose(purpose)
        if not self.drawn_queries(purpose):
            raise ConfigError(
                f"device {self.device.name!r} does not answer drawn {purpose} queries exactly "
                "(engine, non-idealities in view); use query_settings."
            )
        theta = self.device.theta.detach()
        phi = self._attempt(
            lambda: self.device.query_drawn(
                probes,
                theta,
                seed=seed,
                first=first_index,
                count=count,
                step=step,
                weights=weights,
                purpose=purpose,
            ),
            purpose,
            check,
        )
        self.reprograms[purpose] += count
        self.queries[purpose] += count * probes.shape[-2]
        if count:  # the last setting, as query_settings would have sent it
            last = torch.arange(first_index + count - 1, first_index + count, device=theta.device)  # no copy from host
            direction = self.device.drawn_directions(seed, last)[0].to(theta.dtype)
            self._programmed = torch.add(theta.reshape(-1), direction, alpha=step).view_as(theta)
        return phi

    def read_matrix(self, purpose: str = "readout") -> Tensor:
        """Read A(θ) (m, n) out at the live θ with n queries (the identity's rows). With
        ``keep_readings`` the reading is kept (and checkpointed): :meth:`reading_at` hands it to a
        later caller that needs the same matrix."""
        theta = self.device.theta.detach()
        eye = torch.eye(self.device.d_in, dtype=theta.dtype, device=theta.device)
        matrix = self.query(eye, purpose).T
        if not self.keep_readings:
            return matrix
        self._reading = {
            "theta": theta.clone(),
            "drift_steps": self.drift_steps,
            "noisy": _sees_nonidealities(self.device, purpose),
            "matrix": matrix.clone(),
        }
        return matrix

    def reading_at(self, theta: Tensor, purpose: str) -> Tensor | None:
        """The last :meth:`read_matrix` reading if it still is a reading of A(θ) as a query for
        ``purpose`` would see it: taken at exactly this θ, under the same (simulated) drift, with
        the same non-idealities in view (``nonideal.queries``); else None. A reading is one
        measurement, noise included: reusing it spares its queries and changes nothing else."""
        reading = self._reading
        if reading is None or reading["noisy"] != _sees_nonidealities(self.device, purpose):
            return None
        return reading["matrix"] if self.still_current(reading, theta) else None

    def step_drift(self) -> None:
        """Advance the device's drift by one training step. For a device that drifts (:func:`drifts`),
        a reading taken before no longer is one of the device: it is dropped, and every reading
        stamped with an earlier :attr:`drift_steps` is stale."""
        self.device.step_drift()
        if drifts(self.device):
            self.drift_steps += 1
            self._reading = None

    def still_current(self, saved: dict, theta: Tensor) -> bool:
        """Whether readings taken at ``saved["theta"]`` after ``saved["drift_steps"]`` drift steps still
        are readings of the device at ``theta``: the same θ exactly, no drift step since. Decided from
        what the trainer itself did (programmed θ, stepped the drift), never from the device's
        hidden state, so a simulator and a served chip behave alike."""
        return saved.get("drift_steps") == self.drift_steps and torch.equal(saved["theta"], theta.detach())

    def _send(self, x: Tensor, theta: Tensor, purpose: str, check: bool = True) -> Tensor:
        return self._attempt(lambda: self.device.query(x, theta, purpose=purpose), purpose, check)

    def _attempt(self, ask: Callable[[], Tensor], purpose: str, check: bool) -> Tensor:
        """``ask()`` (one query to the device), retried while it raises, is slow or (``check``)
        returns non-finite values; DeviceFailure after ``max_retries`` retries."""
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            start = time.monotonic()
            try:
                y = ask()
            except DeviceFault as err:
                last_error = err
                continue
            finally:
                self.wait_seconds += time.monotonic() - start
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                last_error = DeviceFault(f"query took longer than timeout_s={self.timeout_s}")
                continue
            if check and not _finite(y):
                last_error = DeviceFault("query returned non-finite values")
                continue
            return y
        raise DeviceFailure(
            f"device {self.device.name!r}: a {purpose} query failed {self.max_retries + 1} times "
            f"(last error: {last_error}); the run stops."
        )

    # ----------------------------------------------------------------- oracle access
    def oracle_matrix(self, theta: Tensor | None = None) -> Tensor:
        """The true A(θ) (m, n) from the simulator; differentiable; counted as oracle."""
        self.oracle += 1
        return self.device.matrix(theta)

    def oracle_simulate(self, x: Tensor, theta: Tensor | None = None) -> Tensor:
        """The simulator's x A(θ)ᵀ (differentiable, noise-free); counted as oracle."""
        self.oracle += 1
        return self.device.simulate(x, theta)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "queries": dict(self.queries),
            "reprograms": dict(self.reprograms),
            "oracle": self.oracle,
            "retries": self.retries,
            "skipped": dict(self.skipped),
            "wait_seconds": self.wait_seconds,
            "programmed": None if self._programmed is None else self._programmed.cpu(),
            "drift_steps": self.drift_steps,
            "reading": None
            if self._reading is None
            else {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self._reading.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.queries = dict(state["queries"])
        self.reprograms = dict(state["reprograms"])
        self.oracle = int(state["oracle"])
        self.retries = int(state["retries"])
        self.skipped = dict(state["skipped"])
        self.wait_seconds = float(state.get("wait_seconds", 0.0))  # absent in older checkpoints
        self.drift_steps = int(state.get("drift_steps", 0))  # absent in older checkpoints (readings then are stale)
        programmed = state["programmed"]
        self._programmed = None if programmed is None else programmed.to(self.device.theta.device)
        reading = state.get("reading")  # absent in older checkpoints: the next step reads again
        self._reading = (
            None
            if reading is None
            else {k: v.to(self.device.theta.device) if isinstance(v, Tensor) else v for k, v in reading.items()}
        )

    @staticmethod
    def _check_purpose(purpose: str) -> None:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown query purpose {purpose!r}; allowed: {PURPOSES}")


def _sees_nonidealities(device: Device, purpose: str) -> bool:
    """Whether a query for ``purpose`` sees the non-idealities; for a device that does not say (a
    served chip), only the forward pass is assumed to see them (``nonideal.queries=forward`` is the
    one setting under which purposes differ)."""
    sees = getattr(device, "sees_nonidealities", None)
    return sees(purpose) if sees is not None else purpose == "forward"


def drifts(device: Device) -> bool:
    """Whether ``device`` says it drifts between training steps (``Device.drifts``: a simulator with
    ``nonideal.drift_std``; a served chip whose server says ``needs_step``). A device that does not say
    is assumed to drift, so no reading outlives a drift step on it."""
    says = getattr(device, "drifts", None)
    return True if says is None else bool(says)


def _finite(y: Tensor) -> bool:
    """Whether every reading is finite. A finite sum proves it (NaN and ±Inf reach the sum); only
    where the sum is not finite, which finite readings can also give by overflowing, do the min and
    the max decide (no mask of y's size either way)."""
    if y.numel() == 0 or bool(torch.isfinite(y.sum())):
        return True
    low, high = torch.aminmax(y)
    return bool(torch.isfinite(low) & torch.isfinite(high))
