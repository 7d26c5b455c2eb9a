"""``device=remote``: a device served by ``astraora-device-server``, used like any other device.

The training process owns θ (:attr:`RemoteDevice.theta`) and sends the settings with every query;
the server applies them, so the ledger counts queries and reprograms exactly as in-process. A
timeout, a lost connection or an error reply raises :class:`DeviceFault`, which the ledger
retries and, when it persists, turns into :class:`DeviceFailure` (checkpoint, exit code 3).
"""

from __future__ import annotations

import itertools
import logging
import math
import dataclasses

import torch
import zmq
from torch import Tensor, nn

from astraora.devices.base import NonIdealities
from astraora.errors import AstraoraError, ConfigError, DeviceFailure, DeviceFault
from astraora.remote.token import TOKEN_ENV, read_token
from astraora.remote.wire import DTYPES, MAX_HEADER_BYTES, PROTOCOL_VERSION, ProtocolError, decode, encode, encoded_size

log = logging.getLogger("astraora.remote")
MIB = 2**20


class RemoteError(DeviceFault):
    """The server answered with an error reply; ``code`` says which kind (docs/PROTOCOL.md)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class Connection:
    """Request/reply over a ZeroMQ DEALER socket, with a deadline per request.

    After a timeout the socket is thrown away (unsent and late messages with it) and the next
    request connects afresh, so a restarted server is picked up and never sees stale requests.
    """

    def __init__(self, address: str, token: str, timeout_s: float, max_message_bytes: int):
        self.address, self._token = address, token
        self.timeout_s, self.max_message_bytes = float(timeout_s), int(max_message_bytes)
        self._socket: zmq.Socket | None = None
        self._ids = itertools.count(1)

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + MAX_HEADER_BYTES)
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, op: str, fields: dict | None = None, tensors: dict[str, Tensor] | None = None,
                timeout_s: float | None = None) -> tuple[dict, dict[str, Tensor]]:
        """Send one request and wait for its reply; :class:`DeviceFault` on timeout or error reply."""
        request_id = next(self._ids)
        frames = encode({"v": PROTOCOL_VERSION, "op": op, "id": request_id, "token": self._token, **(fields or {})}, tensors)
        size = encoded_size(frames)
        if size > self.max_message_bytes:
            raise ConfigError(f"a {op} message of {size / MIB:.1f} MiB exceeds device.max_message_mb="
                              f"{self.max_message_bytes / MIB:g}; raise it (and server.max_message_mb on the server).")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sock = self._connect()
        try:
            sock.send_multipart(frames, copy=False)
            deadline_ms = timeout * 1000
            while sock.poll(deadline_ms, zmq.POLLIN):
                header, out = decode(sock.recv_multipart(copy=True), self.max_message_bytes + MAX_HEADER_BYTES)
                if header.get("id") == request_id:
                    break  # anything else is a late answer to an abandoned request
            else:
                self.close()
                raise DeviceFault(f"device server {self.address} did not answer the {op} request within {timeout:g} s")
        except zmq.ZMQError as err:
            self.close()
            raise DeviceFault(f"device server {self.address}: {op} request failed ({err})") from None
        except ProtocolError as err:
            self.close()
            raise DeviceFault(f"device server {self.address} sent an unreadable {op} reply ({err})") from None
        if not header.get("ok"):
            error = header.get("error") if isinstance(header.get("error"), dict) else {}
            code, message = str(error.get("code", "unknown")), str(error.get("message", "no message"))
            raise RemoteError(f"device server {self.address} refused {op} ({code}): {message}", code)
        return header, out


class RemoteDevice(nn.Module):
    """A device behind ``astraora-device-server``; the interface of :class:`astraora.devices.Device`.

    Args:
        d_in, d_out: the layer's shape (a fixed-shape lab device refuses others).
        address: the server's ZeroMQ endpoint, e.g. ``tcp://lab-pc:5555``.
        token_file: a file holding the shared token; None reads ``$ASTRAORA_DEVICE_TOKEN``.
        timeout_s: seconds to wait for one reply before the call counts as failed.
        open_timeout_s: seconds to wait for the server when the layer is built.
        max_message_mb: largest message sent; bigger calls are split (the server's own limit, if
            smaller, wins).
        control_retries: retries of the per-step and checkpoint calls (drift step, state), which
            do not go through the ledger.
        seed, name: the run seed and the layer's stable name; a simulator is built from them, so
            it starts from the same θ and draws the same noise as it would in-process.
        token: the token itself, for programs and tests (never put it in a config file).

    ``has_simulator`` is False: only ``mode=zo+sm`` trains on it, and the oracle diagnostics are
    skipped. Wall time spent waiting is in the ledger's ``wait_seconds``.
    """

    has_simulator = False
    is_remote = True

    def __init__(self, d_in: int, d_out: int, *, address: str = "tcp://127.0.0.1:5555", token_file: str | None = None,
                 timeout_s: float = 30.0, open_timeout_s: float = 30.0, max_message_mb: float = 64,
                 control_retries: int = 3, seed: int = 0, name: str = "device", token: str | None = None):
        super().__init__()
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"device.address={address!r} must be a tcp:// or ipc:// endpoint, e.g. tcp://127.0.0.1:5555.")
        for key, value in (("timeout_s", timeout_s), ("open_timeout_s", open_timeout_s), ("max_message_mb", max_message_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"device.{key}={value!r} is not allowed; it must be a number > 0.")
        if isinstance(control_retries, bool) or not isinstance(control_retries, int) or control_retries < 0:
            raise ConfigError(f"device.control_retries={control_retries!r} must be an integer >= 0.")
        self.d_in, self.d_out, self.seed, self.name = int(d_in), int(d_out), int(seed), name
        self.address, self.open_timeout_s, self.control_retries = address, float(open_timeout_s), control_retries
        token = token or read_token(token_file, "device.token_file")
        self.connection = Connection(address, token, timeout_s, int(max_message_mb * MIB))
        self._states: dict[str, Tensor] = {}  # the server-side generator states last seen (for checkpoints)
        theta = self._open()
        self.theta = nn.Parameter(theta.to(torch.get_default_dtype()) if theta.is_floating_point() else theta)

    # ----------------------------------------------------------------- session
    def _open(self) -> Tensor:
        """Open the layer on the server; returns the θ it starts from."""
        fields = {"d_in": self.d_in, "d_out": self.d_out, "seed": self.seed, "name": self.name}
        try:
            header, tensors = self.connection.request("open", fields, timeout_s=self.open_timeout_s)
        except RemoteError as err:
            if err.code == "auth":
                raise ConfigError(f"device server {self.address} refused the token; check ${TOKEN_ENV} or device.token_file.") from None
            raise ConfigError(str(err)) from None
        except DeviceFault as err:
            raise DeviceFailure(f"{err} (is astraora-device-server running there?)") from None
        info = header.get("info")
        if not isinstance(header.get("handle"), str) or not isinstance(info, dict) or "theta" not in tensors:
            raise DeviceFailure(f"device server {self.address} answered open without a handle, info and theta.")
        self.handle, self.info = header["handle"], info
        self.theta_shape_ = tuple(info["theta_shape"])
        self.wire_dtype = DTYPES.get(info.get("dtype"), torch.float32)
        self.is_phase_device = info.get("phase_range") is not None
        known = {f.name for f in dataclasses.fields(NonIdealities)}
        self.nonideal = NonIdealities(**{k: v for k, v in (info.get("nonideal") or {}).items() if k in known})
        server_limit = int(info.get("max_message_bytes") or self.connection.max_message_bytes)
        self.connection.max_message_bytes = min(self.connection.max_message_bytes, server_limit)
        self._live_sent: Tensor | None = None  # the θ the server's copy of the live parameter holds
        return tensors["theta"]

    def _reopen(self) -> None:
        """After a server restart: a fresh layer there, with the last known generator states."""
        log.warning("device server %s lost layer %r (restarted?); opening it again", self.address, self.name)
        try:
            self._open()
        except (ConfigError, DeviceFailure) as err:  # mid-run: a fault like any other, for the ledger to retry
            raise DeviceFault(str(err)) from None
        if self._states:
            self.connection.request("set_state", {"handle": self.handle}, self._states)

    def _call(self, op: str, fields: dict | None = None, tensors: dict[str, Tensor] | None = None):
        """One request on this layer; reopens it once if the server no longer knows it."""
        for attempt in range(2):
            try:
                return self.connection.request(op, {"handle": self.handle, **(fields or {})}, tensors)
            except RemoteError as err:
                if err.code != "unknown_handle" or attempt:
                    raise
            self._reopen()
            if tensors is not None and "live" not in tensors and op == "query":
                tensors = {**tensors, "live": self.theta.detach()}
                self._live_sent = self.theta.detach().clone()

    def _with_retries(self, op: str, fields: dict | None = None, tensors: dict[str, Tensor] | None = None):
        """A call outside the ledger (drift step, state): retried, then :class:`DeviceFailure`."""
        for attempt in range(self.control_retries + 1):
            try:
                return self._call(op, fields, tensors)
            except DeviceFault as err:
                last = err
        raise DeviceFailure(f"device {self.name!r}: a {op} call failed {self.control_retries + 1} times "
                            f"(last error: {last}); stopping after a checkpoint.")

    def close(self) -> None:
        """Release the layer on the server (best effort) and the socket."""
        try:
            self.connection.request("close", {"handle": self.handle}, timeout_s=min(1.0, self.connection.timeout_s))
        except AstraoraError:
            pass
        self.connection.close()

    # ----------------------------------------------------------------- the device interface
    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, p={self.num_params}, address={self.address}, identity={self.info.get('identity')!r}"

    def theta_shape(self) -> tuple[int, ...]:
        return self.theta_shape_

    @torch.no_grad()
    def query(self, x: Tensor, theta: Tensor | None = None, *, purpose: str = "forward") -> Tensor:
        """Rows x (B, n) at θ (``theta_shape``) → (B, m), or at K settings (K, *theta_shape) with
        x (B, n) or (K, B, n) → (K, B, m); one request unless the message or row limits split it."""
        single = theta is None or theta.dim() == len(self.theta_shape_)
        thetas = (self.theta if theta is None else theta).detach()
        thetas = thetas.unsqueeze(0) if single else thetas
        out_device, out_dtype = x.device, x.dtype
        x = x.detach().to("cpu", self.wire_dtype)
        thetas = thetas.to("cpu", self.wire_dtype)
        k_total, rows_total = thetas.shape[0], x.shape[-2]
        k_step, row_step = self._split(k_total, rows_total, shared_rows=x.dim() == 2)
        if single and k_step >= 1 and row_step >= rows_total:
            y = self._query_once(x, thetas[0], purpose)  # the common case: exactly the in-process call
            return y.to(out_device, out_dtype)
        y = torch.empty(k_total, rows_total, self.d_out, dtype=self.wire_dtype)
        for k0 in range(0, k_total, k_step):
            ks = slice(k0, k0 + k_step)
            for r0 in range(0, rows_total, row_step):
                rs = slice(r0, r0 + row_step)
                rows = x[rs] if x.dim() == 2 else x[ks, rs]
                y[ks, rs] = self._query_once(rows, thetas[0], purpose) if single else self._query_once(rows, thetas[ks], purpose)
        return (y[0] if single else y).to(out_device, out_dtype)

    def _query_once(self, x: Tensor, theta: Tensor, purpose: str) -> Tensor:
        tensors = {"x": x, "theta": theta}
        live = self.theta.detach()
        if self._live_sent is None or not torch.equal(live, self._live_sent):
            tensors["live"] = live.to("cpu", self.wire_dtype)
            sent = live.clone()
        else:
            sent = None
        _, out = self._call("query", {"purpose": purpose}, tensors)
        if sent is not None:
            self._live_sent = sent
        y = out.get("y")
        expected = (*x.shape[:-1], self.d_out) if theta.dim() == len(self.theta_shape_) or x.dim() == 3 else (theta.shape[0], x.shape[0], self.d_out)
        if y is None or tuple(y.shape) != expected:
            raise DeviceFault(f"device server {self.address} answered a query with {None if y is None else list(y.shape)}, not {list(expected)}")
        return y

    def _split(self, settings: int, rows: int, shared_rows: bool) -> tuple[int, int]:
        """Settings and rows per request so that requests and replies fit the message limit and
        the device's row limit."""
        size = self.wire_dtype.itemsize
        p, n, m = math.prod(self.theta_shape_) * size, self.d_in * size, self.d_out * size
        budget = self.connection.max_message_bytes - MAX_HEADER_BYTES - p  # p: the live θ may ride along
        row_step = min(rows, int(self.info.get("max_rows") or rows))
        row_step = min(row_step, max(0, (budget - p) // (n + m)))
        if row_step < 1:
            raise ConfigError(f"one setting of θ with one row does not fit device.max_message_mb="
                              f"{self.connection.max_message_bytes / MIB:g}; raise it (and server.max_message_mb).")
        shared = row_step * n if shared_rows else 0
        per_setting = p + (0 if shared_rows else row_step * n)
        k_step = min(settings, (budget - shared) // per_setting, budget // (row_step * m))
        return max(1, k_step), row_step

    @torch.no_grad()
    def step_drift(self) -> None:
        """Once per training step: a simulator with drift advances it on the server."""
        if self.info.get("needs_step"):
            self._with_retries("step")

    def forward_output_gives_phi(self, compressed: bool) -> bool:
        """Whether the forward output gives the ZO estimator φ(θ) exactly (the server's device says)."""
        return bool(self.info.get("phi_from_forward", (True, True))[int(compressed)])

    def jacobian_offsets(self) -> tuple[int, ...] | None:
        """The entry-wise structure the server's device declares (``zo=colored``), or None."""
        offsets = self.info.get("jacobian_offsets")
        return None if offsets is None else tuple(int(o) for o in offsets)

    def simulate(self, x: Tensor, theta: Tensor | None = None) -> Tensor:
        raise AstraoraError("device=remote has no simulator (mode=zo+sm only; oracle diagnostics are skipped).")

    def matrix(self, theta: Tensor | None = None) -> Tensor:
        return self.simulate(torch.empty(0), theta)

    # ----------------------------------------------------------------- checkpoint state
    def generator_states(self) -> dict[str, Tensor]:
        """The server-side device's state (generators, drift) for a checkpoint. When the server
        cannot be reached (the checkpoint a device failure writes) the last known state is used."""
        try:
            _, self._states = self._call("get_state")
        except DeviceFault as err:
            log.warning("device %r: checkpointing its last known state (%s)", self.name, err)
        return dict(self._states)

    def load_generator_states(self, states: dict[str, Tensor]) -> None:
        self._states = dict(states)
        if states:
            self._with_retries("set_state", tensors=self._states)
