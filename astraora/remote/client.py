"""``device=remote``: a device served by ``astraora-device-server``, used like any other device.

The training process owns θ (:attr:`RemoteDevice.theta`) and sends the settings with every query;
the server applies them, so the ledger counts queries and reprograms exactly as in-process. A
timeout, a lost connection or an error reply raises :class:`DeviceFault`, which the ledger
retries and, when it persists, turns into :class:`DeviceFailure` (checkpoint, exit code 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import time

import torch
import zmq
from torch import Tensor, nn
from zmq.utils.monitor import recv_monitor_message

from astraora.devices.base import NonIdealities
from astraora.errors import AstraoraError, ConfigError, DeviceFailure, DeviceFault
from astraora.remote.keys import ClientKeys
from astraora.remote.token import TOKEN_ENV
from astraora.remote.wire import DTYPES, MAX_HEADER_BYTES, PROTOCOL_VERSION, ProtocolError, decode, encode, encoded_size

log = logging.getLogger("astraora.remote")
MIB = 2**20
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
)
MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | sum(HANDSHAKE_FAILED)

_REQUEST_IDS = itertools.count(1)  # one counter per process: ids never repeat within a session
_SESSIONS: dict[tuple[int, str], str] = {}


def process_session(address: str) -> str:
    """This process's session id at ``address`` (a forked process gets its own)."""
    return _SESSIONS.setdefault((os.getpid(), address), secrets.token_hex(16))


class RemoteError(DeviceFault):
    """The server answered with an error reply (or refused the keys); ``code`` says which kind (docs/PROTOCOL.md)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class ConnectionLost(DeviceFault):
    """No connection to the server: it closed the connection, or none was made within the connect timeout."""


def _digest(op: str, fields: dict | None, tensors: dict[str, Tensor] | None) -> bytes:
    """What identifies a request's content: a retry with the same digest reuses the failed request's id."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([op, fields or {}], sort_keys=True).encode())
    for name, t in (tensors or {}).items():
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.digest()


class Connection:
    """Request/reply over a CurveZMQ DEALER socket, watched by a socket monitor.

    A request fails with :class:`DeviceFault` when its reply does not come within ``timeout_s``,
    at once when the server closes the connection (killed, restarted; heartbeats notice a silent
    host within ``heartbeat_timeout_s``), and when no connection is made within
    ``connect_timeout_s``. A refused key is :class:`RemoteError` code ``auth``. After a failure the
    socket is thrown away (unsent and late messages with it) and the next request connects afresh.
    The next request with the same op and content reuses the failed one's id, so a server that
    ran it already answers from its cache instead of running it twice.
    """

    def __init__(
        self,
        address: str,
        keys: ClientKeys,
        timeout_s: float,
        max_message_bytes: int,
        *,
        session: str | None = None,
        connect_timeout_s: float = 3.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
    ):
        self.address, self._keys = address, keys
        self.timeout_s, self.max_message_bytes = float(timeout_s), int(max_message_bytes)
        self.connect_timeout_s = float(connect_timeout_s)
        self.heartbeat_s, self.heartbeat_timeout_s = float(heartbeat_s), float(heartbeat_timeout_s)
        self.session = session or process_session(address)
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._handshaken = False
        self._failed_handshakes = 0  # handshakes failed in a row on this socket
        self._failed: tuple[str, bytes, int] | None = None  # (op, digest, id) of the last request that got no reply
        self.down = False  # the last request found no connection to the server

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            context = zmq.Context.instance()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + MAX_HEADER_BYTES)
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout_s * 1000))
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(max(self.connect_timeout_s, 1.0) * 1000))
            sock.curve_secretkey, sock.curve_publickey = self._keys.secret, self._keys.public
            sock.curve_serverkey = self._keys.server
            monitor = f"inproc://astraora-client-monitor-{secrets.token_hex(8)}"
            sock.monitor(monitor, MONITORED)
            self._monitor = context.socket(zmq.PAIR)
            self._monitor.connect(monitor)
            sock.connect(self.address)
            self._socket, self._handshaken, self._failed_handshakes = sock, False, 0
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._monitor.close(linger=0)
            self._socket = self._monitor = None

    def _events(self) -> None:
        """Read the monitor: a handshake that succeeded, failed (raises) or a connection lost (raises)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken, self._failed_handshakes = True, 0
            elif event in HANDSHAKE_FAILED:
                # a refused key closes every attempt (ZeroMQ retries within 0.1 s); one failed handshake
                # alone may be a server dying mid-handshake. ZAP's refusal is certain at once.
                self._failed_handshakes += 1
                if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH and self._failed_handshakes < 2:
                    continue
                self.close()
                raise RemoteError(
                    f"device server {self.address} refused this client's key at the handshake ({self._keys.hint})",
                    "auth",
                )
            elif event == zmq.EVENT_DISCONNECTED and self._handshaken:
                self.close()
                raise ConnectionLost(f"device server {self.address} closed the connection (stopped or restarted?)")

    def request(
        self,
        op: str,
        fields: dict | None = None,
        tensors: dict[str, Tensor] | None = None,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> tuple[dict, dict[str, Tensor]]:
        """Send one request and wait for its reply; :class:`DeviceFault` on timeout, lost connection or error reply."""
        failed, self._failed = self._failed, None
        request_id = None
        if failed is not None and failed[0] == op and failed[1] == _digest(op, fields, tensors):
            request_id = failed[2]  # the same request again: the server answers it once
        request_id = request_id or next(_REQUEST_IDS)
        header = {"v": PROTOCOL_VERSION, "op": op, "id": request_id, "session": self.session, **(fields or {})}
        frames = encode(header, tensors)
        size = encoded_size(frames)
        if size > self.max_message_bytes:
            raise ConfigError(
                f"a {op} message of {size / MIB:.1f} MiB exceeds device.max_message_mb="
                f"{self.max_message_bytes / MIB:g}; raise it (and server.max_message_mb on the server)."
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        connect_timeout = self.connect_timeout_s if connect_timeout_s is None else connect_timeout_s
        try:
            header, out = self._exchange(op, frames, request_id, timeout, connect_timeout)
        except RemoteError:
            raise
        except DeviceFault as err:
            self._failed = (op, _digest(op, fields, tensors), request_id)
            self.down = isinstance(err, ConnectionLost)
            raise
        self.down = False
        if not header.get("ok"):
            error = header.get("error") if isinstance(header.get("error"), dict) else {}
            code, message = str(error.get("code", "unknown")), str(error.get("message", "no message"))
            raise RemoteError(f"device server {self.address} refused {op} ({code}): {message}", code)
        return header, out

    def _exchange(self, op: str, frames: list, request_id: int, timeout: float, connect_timeout: float):
        start = time.monotonic()
        try:
            sock = self._connect()
            try:
                self._events()  # a connection lost since the last request: start afresh
            except ConnectionLost:
                sock = self._connect()
            sock.send_multipart(frames, copy=False)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            while True:
                self._events()
                if sock.poll(0, zmq.POLLIN):
                    header, out = decode(sock.recv_multipart(copy=True), self.max_message_bytes + MAX_HEADER_BYTES)
                    if header.get("id") == request_id:
                        return header, out
                    continue  # a late answer to an abandoned request
                now = time.monotonic()
                if not self._handshaken and now - start >= min(connect_timeout, timeout):
                    self.close()
                    raise ConnectionLost(
                        f"device server {self.address}: no connection within "
                        f"{min(connect_timeout, timeout):g} s (is astraora-device-server running there?)"
                    )
                if now - start >= timeout:
                    self.close()
                    raise DeviceFault(
                        f"device server {self.address} did not answer the {op} request within {timeout:g} s"
                    )
                until = timeout if self._handshaken else min(timeout, connect_timeout)
                poller.poll(max(1, int((until - (now - start)) * 1000)))
        except zmq.ZMQError as err:
            self.close()
            raise DeviceFault(f"device server {self.address}: {op} request failed ({err})") from None
        except ProtocolError as err:
            self.close()
            raise DeviceFault(f"device server {self.address} sent an unreadable {op} reply ({err})") from None


class RemoteDevice(nn.Module):
    """A device behind ``astraora-device-server``; the interface of :class:`astraora.devices.Device`.

    Args:
        d_in, d_out: the layer's shape (a fixed-shape lab device refuses others).
        address: the server's ZeroMQ endpoint, e.g. ``tcp://lab-pc:5555``.
        token_file: a file holding the shared token; None reads ``$ASTRAORA_DEVICE_TOKEN``.
        key_file: this client's own CURVE key pair (a ``.key_secret`` file) instead of the token's.
        server_key: the server's public key (a ``.key`` file) instead of the token's.
        timeout_s: seconds to wait for one reply from a live server before the call counts as failed.
        open_timeout_s: seconds to wait for the server when the layer is built.
        connect_timeout_s: seconds a call waits for a connection (a server that is down) mid-run.
        heartbeat_s, heartbeat_timeout_s: ZeroMQ heartbeats: a server silent for the timeout is gone.
        max_message_mb: largest message sent; bigger calls are split (the server's own limit, if
            smaller, wins).
        control_retries: retries of the per-step and checkpoint calls (drift step, state), which
            do not go through the ledger.
        seed, name: the run seed and the layer's stable name; a simulator is built from them, so
            it starts from the same θ and draws the same noise as it would in-process.
        secret: the token itself, for programs and tests (a config never holds it: ``device.token``
            is refused).
        session: the session id (default: one per process and server).

    ``has_simulator`` is False: only ``mode=zo+sm`` trains on it, and the oracle diagnostics are
    skipped. Wall time spent waiting is in the ledger's ``wait_seconds``.
    """

    has_simulator = False
    is_remote = True

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        address: str = "tcp://127.0.0.1:5555",
        token_file: str | None = None,
        key_file: str | None = None,
        server_key: str | None = None,
        timeout_s: float = 30.0,
        open_timeout_s: float = 30.0,
        connect_timeout_s: float = 3.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        max_message_mb: float = 64,
        control_retries: int = 3,
        seed: int = 0,
        name: str = "device",
        secret: str | None = None,
        session: str | None = None,
        token=None,
    ):
        super().__init__()
        if token is not None:
            raise ConfigError(
                f"device.token is not allowed: a config (saved with every run) is no place for a secret; "
                f"set ${TOKEN_ENV} or device.token_file."
            )
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
            raise ConfigError(
                f"device.address={address!r} must be a tcp:// or ipc:// endpoint, e.g. tcp://127.0.0.1:5555."
            )
        for key, value in (
            ("timeout_s", timeout_s),
            ("open_timeout_s", open_timeout_s),
            ("connect_timeout_s", connect_timeout_s),
            ("heartbeat_s", heartbeat_s),
            ("heartbeat_timeout_s", heartbeat_timeout_s),
            ("max_message_mb", max_message_mb),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"device.{key}={value!r} is not allowed; it must be a number > 0.")
        if heartbeat_timeout_s <= heartbeat_s:
            raise ConfigError(
                f"device.heartbeat_timeout_s={heartbeat_timeout_s} must exceed device.heartbeat_s={heartbeat_s}."
            )
        if isinstance(control_retries, bool) or not isinstance(control_retries, int) or control_retries < 0:
            raise ConfigError(f"device.control_retries={control_retries!r} must be an integer >= 0.")
        self.d_in, self.d_out, self.seed, self.name = int(d_in), int(d_out), int(seed), name
        self.address, self.open_timeout_s, self.control_retries = address, float(open_timeout_s), control_retries
        keys = ClientKeys.from_config(key_file, server_key, token_file, token=secret)
        self.connection = Connection(
            address,
            keys,
            timeout_s,
            int(max_message_mb * MIB),
            session=session,
            connect_timeout_s=connect_timeout_s,
            heartbeat_s=heartbeat_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        self._states: dict[str, Tensor] = {}  # the server-side generator states last seen (for checkpoints)
        theta = self._open(self.open_timeout_s)
        self.theta = nn.Parameter(theta.to(torch.get_default_dtype()) if theta.is_floating_point() else theta)

    # ----------------------------------------------------------------- session
    def _open(self, timeout_s: float) -> Tensor:
        """Open the layer on the server; returns the θ it starts from."""
        fields = {"d_in": self.d_in, "d_out": self.d_out, "seed": self.seed, "name": self.name}
        try:
            header, tensors = self.connection.request("open", fields, timeout_s=timeout_s, connect_timeout_s=timeout_s)
        except RemoteError as err:
            raise ConfigError(str(err)) from None  # a refused key, shape or limit: one line, exit 2
        except DeviceFault as err:
            hint = "" if "running there" in str(err) else " (is astraora-device-server running there?)"
            raise DeviceFailure(f"{err}{hint}") from None
        info = header.get("info")
        if not isinstance(header.get("handle"), str) or not isinstance(info, dict) or "theta" not in tensors:
            raise DeviceFailure(f"device server {self.address} answered open without a handle, info and theta.")
        self.handle, self.info = header["handle"], info
        self.theta_shape_ = tuple(info["theta_shape"])
        self.wire_dtype = DTYPES.get(info.get("dtype"), torch.float32)
        self.is_phase_device = info.get("phase_range") is not None
        self.stateful = bool(info.get("stateful", True))
        known = {f.name for f in dataclasses.fields(NonIdealities)}
        self.nonideal = NonIdealities(**{k: v for k, v in (info.get("nonideal") or {}).items() if k in known})
        server_limit = int(info.get("max_message_bytes") or self.connection.max_message_bytes)
        self.connection.max_message_bytes = min(self.connection.max_message_bytes, server_limit)
        self._live_sent: Tensor | None = None  # the θ the server's copy of the live parameter holds
        self._split_parts: tuple | None = None  # (purpose, x, thetas, {part: reading}) of a failed split call
        return tensors["theta"]

    def _reopen(self) -> None:
        """The server lost the layer (restarted, or the session expired). A device without state
        (no noise, drift or fault generators) is opened again and continues exactly; one with state
        would continue from a rewound state, so the run stops (resume from the last checkpoint)."""
        if self.stateful:
            raise DeviceFailure(
                f"device server {self.address} lost layer {self.name!r} (restarted?); "
                "resume=<run dir> continues exactly from the last checkpoint."
            )
        log.warning(
            "device server %s lost layer %r (restarted?); opening it again (the device keeps no state)",
            self.address,
            self.name,
        )
        try:
            self._open(self.connection.timeout_s)
        except (ConfigError, DeviceFailure) as err:  # mid-run: a fault like any other, for the ledger to retry
            raise DeviceFault(str(err)) from None
        if self.stateful:
            raise DeviceFailure(
                f"device server {self.address} lost layer {self.name!r} and now serves it with state "
                "(another device?); resume=<run dir> continues exactly from the last checkpoint."
            )

    def _call(self, op: str, fields: dict | None = None, tensors: dict[str, Tensor] | None = None):
        """One request on this layer; a layer the server lost is opened again only if it keeps no state."""
        for attempt in range(2):
            try:
                return self.connection.request(op, {"handle": self.handle, **(fields or {})}, tensors)
            except RemoteError as err:
                if err.code != "unknown_handle" or attempt:
                    raise
            self._reopen()
            if tensors is not None and "live" not in tensors and op == "query":
                tensors = {**tensors, "live": self.theta.detach().to("cpu", self.wire_dtype)}
                self._live_sent = self.theta.detach().clone()

    def _with_retries(self, op: str, fields: dict | None = None, tensors: dict[str, Tensor] | None = None):
        """A call outside the ledger (drift step, state): retried, then :class:`DeviceFailure`."""
        for _ in range(self.control_retries + 1):
            try:
                return self._call(op, fields, tensors)
            except DeviceFault as err:
                last = err
        raise DeviceFailure(
            f"device {self.name!r}: a {op} call failed {self.control_retries + 1} times "
            f"(last error: {last}); the run stops."
        )

    def close(self) -> None:
        """Release the layer on the server (best effort) and the socket."""
        try:
            self.connection.request(
                "close",
                {"handle": self.handle},
                timeout_s=min(1.0, self.connection.timeout_s),
                connect_timeout_s=min(1.0, self.connection.connect_timeout_s),
            )
        except AstraoraError:
            pass
        self.connection.close()

    # ----------------------------------------------------------------- the device interface
    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, p={self.num_params}, address={self.address}, "
            f"identity={self.info.get('identity')!r}"
        )

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
        # A split call that failed part-way and is retried (the ledger sends the same call again) takes
        # the parts already answered from the failed attempt: sent again, they would draw the device's
        # noise twice. Only a failed call is kept, and compared only then (nothing on the normal path).
        failed, self._split_parts = self._split_parts, None
        same = (
            failed is not None and failed[0] == purpose and torch.equal(failed[1], x) and torch.equal(failed[2], thetas)
        )
        answered = failed[3] if same else {}
        y = torch.empty(k_total, rows_total, self.d_out, dtype=self.wire_dtype)
        for k0 in range(0, k_total, k_step):
            ks = slice(k0, k0 + k_step)
            for r0 in range(0, rows_total, row_step):
                rs = slice(r0, r0 + row_step)
                if (k0, r0) not in answered:
                    rows = x[rs] if x.dim() == 2 else x[ks, rs]
                    try:
                        answered[(k0, r0)] = self._query_once(rows, thetas[0] if single else thetas[ks], purpose)
                    except DeviceFault:
                        self._split_parts = (purpose, x.clone(), thetas.clone(), answered)
                        raise
                y[ks, rs] = answered[(k0, r0)]
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
        expected = (
            (*x.shape[:-1], self.d_out)
            if theta.dim() == len(self.theta_shape_) or x.dim() == 3
            else (theta.shape[0], x.shape[0], self.d_out)
        )
        if y is None or tuple(y.shape) != expected:
            raise DeviceFault(
                f"device server {self.address} answered a query with {None if y is None else list(y.shape)}, "
                f"not {list(expected)}"
            )
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
            raise ConfigError(
                f"one setting of θ with one row does not fit device.max_message_mb="
                f"{self.connection.max_message_bytes / MIB:g}; raise it (and server.max_message_mb)."
            )
        shared = row_step * n if shared_rows else 0
        per_setting = p + (0 if shared_rows else row_step * n)
        k_step = min(settings, (budget - shared) // per_setting, budget // (row_step * m))
        return max(1, k_step), row_step

    @torch.no_grad()
    @property
    def drifts(self) -> bool:
        """Whether the served device drifts between steps (its server says ``needs_step``): the ledger
        then drops readings taken before a drift step."""
        return bool(self.info.get("needs_step"))

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
        """The server-side device's state (generators, drift) for a checkpoint: the state it has now,
        or none for a device without state. Where the server cannot give it, no checkpoint may be
        written from a state it no longer has: DeviceFailure (retried first), and the last checkpoint
        on disk stays the one to resume from."""
        if not self.stateful:
            return {}
        _, self._states = self._with_retries("get_state")
        return dict(self._states)

    def load_generator_states(self, states: dict[str, Tensor]) -> None:
        self._states = dict(states)
        if states:
            self._with_retries("set_state", tensors=self._states)
