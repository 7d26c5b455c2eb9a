"""``astraora-device-server``: one device served over the network (docs/PROTOCOL.md).

    ASTRAORA_DEVICE_TOKEN=... astraora-device-server device=mzi server.address=tcp://127.0.0.1:5555

Clients authenticate with CurveZMQ at the connection's handshake (keys derived from the shared
token, or key files, :mod:`astraora.remote.keys`); a peer without the keys never gets a message
through, and everything on the wire is encrypted. Each client holds a *session* (a random id it
sends with every request): its layers, its requests run in order, and its last replies, so that a
retried request is answered again instead of run twice. No session can see, change, close or evict
another's layers; limits are refused, never met by dropping a live layer.

One thread owns the socket (it answers ``ping`` at once and refuses bad requests before they reach
the device); the device work runs in worker threads, one request of a session at a time, and a
device is never called concurrently. For a simulator (``device=mzi``, ``mrr``, ...) the server
builds, per ``open``, the layer the client asks for (shape, seed and name), so the client sees
exactly the device it would have built in-process; a :class:`~astraora.remote.lab.LabDevice` has
one shape and refuses others.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import zmq
from torch import Tensor
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from astraora.cli import config_sources, group_options
from astraora.devices.base import Device
from astraora.errors import AstraoraError, ConfigError, DeviceFault
from astraora.paths import CONFIG_DIR  # also the benchmark's
from astraora.remote.keys import ServerKeys
from astraora.remote.lab import PURPOSES, DeviceInfo, LabDevice, SimulatedDevice
from astraora.remote.wire import DTYPES, PROTOCOL_VERSION, ProtocolError, decode, encode, short

log = logging.getLogger("astraora.server")
MIB = 2**20
NOT_SERVABLE = ("digital", "remote")
ZAP_DOMAIN = "astraora"
SESSION_ID = re.compile(r"[0-9a-f]{16,64}")
MAX_QUEUED = 8  # requests of one session waiting behind the one running; more are refused
CACHED_REPLIES = 2  # replies kept per session for retried requests
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

Opener = Callable[[int, int, int, str], LabDevice]


class RateLimitedLog:
    """Warnings about refused requests, at most ``per_minute`` lines a minute; the rest are counted
    and reported in one line when the minute is over, so a flood of bad messages cannot fill a disk."""

    def __init__(self, logger: logging.Logger, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.logger, self.per_minute, self.clock = logger, int(per_minute), clock
        self.window_start, self.lines, self.suppressed = clock(), 0, 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args, exc_info: bool = False) -> None:
        with self._lock:
            self._roll()
            if self.lines >= self.per_minute:
                self.suppressed += 1
                return
            self.lines += 1
        self.logger.warning(message, *args, exc_info=exc_info)

    def tick(self) -> None:
        """Called now and then: ends the minute (and reports what it suppressed) even when all is quiet."""
        with self._lock:
            self._roll()

    def _roll(self) -> None:
        now = self.clock()
        if now - self.window_start < 60:
            return
        if self.suppressed:
            self.logger.warning(
                "suppressed %d more lines about refused requests in the last %.0f s",
                self.suppressed,
                now - self.window_start,
            )
        self.window_start, self.lines, self.suppressed = now, 0, 0


@dataclass(frozen=True)
class Limits:
    """What one session and the whole server may hold (docs/PROTOCOL.md, "Sessions and limits")."""

    max_sessions: int = 32  # sessions at once (a training process is one session per server)
    max_layers: int = 64  # layers at once, all sessions together
    max_entries: int = 2**30  # Σ d_in·d_out over all layers
    session_max_layers: int = 32
    session_max_entries: int = 2**28  # Σ d_in·d_out over one session's layers
    max_width: int | None = None  # d_in, d_out of a simulator layer (None: the opener decides alone)
    session_idle_s: float = 3600.0  # a session without requests for this long is closed


@dataclass(eq=False)
class Layer:
    """One opened layer of a session."""

    handle: str
    lab: LabDevice
    info: DeviceInfo
    entries: int  # d_in·d_out, counted against the limits


class _Serving:
    """What the server keeps about a device object: its lock (a device is never called
    concurrently; a lab's one chip is shared by every layer) and the setting it holds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.programmed: Tensor | None = None


class Session:
    """One client's layers, its requests (run in order, one at a time) and its last replies."""

    def __init__(self, key: tuple[str, str]):
        self.key = key  # (the peer's CURVE public key as ZAP's User-Id, the client's session id)
        self.layers: dict[str, Layer] = {}
        self.reserved: dict[int, int] = {}  # request id of an open under way → its entries
        self.queue: deque = deque()
        self.busy = False
        self.waiting: dict[int, tuple[str, list[tuple[bytes, list]]]] = {}  # id → (signature, [(routing id, envelope)])
        self.replies: OrderedDict[int, tuple[str, list]] = OrderedDict()  # id → (signature, reply frames)
        self.last_seen = time.monotonic()

    @property
    def layer_count(self) -> int:
        return len(self.layers) + len(self.reserved)

    @property
    def entries(self) -> int:
        return sum(layer.entries for layer in self.layers.values()) + sum(self.reserved.values())


class _Authorized:
    """The ZAP callback: a client is let in when its CURVE public key is one of ``keys``."""

    def __init__(self, keys: frozenset[bytes], denied: Callable[[], None]):
        self.keys, self.denied = keys, denied

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            self.denied()
        return allowed


class DeviceServer:
    """Serves the devices ``opener(d_in, d_out, seed, name)`` returns.

    Args:
        opener: builds (simulator) or hands out (lab device) the device for an ``open`` request;
            raises :class:`ProtocolError` (code ``refused``) for a shape it cannot serve.
        token: the shared secret both sides derive their CURVE keys from (or give ``keys``).
        keys: the server's key pair and the client keys it accepts (:class:`ServerKeys`).
        address: a ZeroMQ endpoint; ``tcp://127.0.0.1:*`` picks a free port (see :attr:`endpoint`).
        max_message_bytes: the largest request accepted (and the frame size ZeroMQ lets in at all).
        delay_s: extra latency added to every program/query call, to rehearse a slow chip.
        max_rows: rows per call, on top of the device's own limit (None: the device's).
        limits: sessions, layers and sizes held at once (:class:`Limits`).
        workers: threads running device work (requests of different sessions run side by side).
        handshake_s: a connection that has not completed the CURVE handshake by then is dropped.
        heartbeat_s, heartbeat_timeout_s: ZeroMQ heartbeats; a silent peer is dropped after the timeout.
        log_per_minute: lines about refused requests per minute (the rest are counted).
        description: what is served, for the log line.
    """

    def __init__(
        self,
        opener: Opener,
        token: str | None = None,
        *,
        keys: ServerKeys | None = None,
        address: str = "tcp://127.0.0.1:5555",
        max_message_bytes: int = 64 * MIB,
        delay_s: float = 0.0,
        max_rows: int | None = None,
        limits: Limits | None = None,
        workers: int = 4,
        handshake_s: float = 5.0,
        heartbeat_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        log_per_minute: int = 20,
        description: str = "device",
    ):
        if keys is None:
            if not token:
                raise ConfigError("a device server needs a token or key files.")
            keys = ServerKeys.from_token(token)
        self.opener, self.keys = opener, keys
        self.address, self.max_message_bytes = address, int(max_message_bytes)
        self.delay_s, self.max_rows = float(delay_s), max_rows
        self.limits = limits or Limits()
        self.workers = int(workers)
        self.handshake_s, self.heartbeat_s, self.heartbeat_timeout_s = handshake_s, heartbeat_s, heartbeat_timeout_s
        self.description = description
        self.bad_log = RateLimitedLog(log, log_per_minute)
        self.sessions: dict[tuple[str, str], Session] = {}
        self._lock = threading.RLock()  # sessions, their layers and queues
        self._lab_lock = threading.Lock()
        self._labs: dict[int, LabDevice] = {}  # lab devices (not per-layer simulators) to close at the end
        self._outbox: queue.Queue = queue.Queue()  # replies from workers, sent by the socket's thread
        self._wake_r = self._wake_w = -1  # a pipe the workers wake the socket's thread with (made by bind)
        self.context: zmq.Context | None = None
        self.socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._auth: ThreadAuthenticator | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._loop_thread: threading.Thread | None = None
        self.endpoint: str | None = None
        self.requests = 0
        self.refused = 0
        self.denied = 0  # handshakes refused (wrong key) or failed
        self.expired = 0

    # ----------------------------------------------------------------- transport
    def bind(self) -> str:
        """Open the listening socket; returns the bound endpoint (with the port chosen for ``:*``)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.context = zmq.Context()  # its own: one ZAP handler per context
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("astraora.server.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, _Authorized(self.keys.authorized, self._count_denied))
        sock = self.socket = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)  # bigger frames: the peer is dropped unread
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.handshake_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout_s * 1000))
        sock.curve_server = True
        sock.curve_secretkey, sock.curve_publickey = self.keys.secret, self.keys.public
        sock.zap_domain = ZAP_DOMAIN.encode()
        monitor = f"inproc://astraora-server-monitor-{secrets.token_hex(8)}"
        sock.monitor(monitor, HANDSHAKE_FAILED)
        self._monitor = self.context.socket(zmq.PAIR)
        self._monitor.connect(monitor)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as err:
            self.close()
            raise ConfigError(f"server.address={self.address} cannot be bound ({err}).") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="astraora-device")
        return self.endpoint

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 100) -> None:
        """Answer requests until ``stop`` is set (or forever)."""
        if self.socket is None:
            self.bind()
        stop = stop or threading.Event()
        self._loop_thread = threading.current_thread()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = 0.0
        while not stop.is_set():
            ready = dict(poller.poll(poll_ms))
            if self.socket in ready:
                self._receive_some()
            if self._wake_r in ready:
                os.read(self._wake_r, 65536)
            self._send_replies()
            if self._monitor in ready:
                self._handshake_events()
            now = time.monotonic()
            if now >= next_tick:
                self._expire(now)
                self.bad_log.tick()
                next_tick = now + 1.0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for sock in (self.socket, self._monitor):
            if sock is not None:
                if sock is self.socket:
                    sock.disable_monitor()
                sock.close(linger=0)
        self.socket = self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.context is not None:
            self.context.destroy(linger=0)
            self.context = None
        for lab in self._labs.values():
            lab.close()
        self._labs.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # the pipe is full (the socket's thread is awake already) or closed (the server stopped)

    def _send(self, frames: list) -> None:
        """Queue a reply; only the socket's thread touches the socket."""
        self._outbox.put(frames)
        if threading.current_thread() is not self._loop_thread:
            self._wake()

    def _send_replies(self) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.socket.send_multipart(frames, copy=False)
            except zmq.ZMQError:
                pass  # the peer left: nobody to answer

    def _count_denied(self) -> None:
        self.denied += 1

    def _handshake_events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason = "its key is not authorized"
            else:
                self.denied += 1
                reason = "wrong server key or not CURVE: another token or key file, or not an astraora client"
            self.bad_log.warning("refused a connection at the handshake (%s)", reason)

    # ----------------------------------------------------------------- one request
    def _receive_some(self, most: int = 64) -> None:
        for _ in range(most):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # no routing identity: nothing to answer
            user = frames[1].get("User-Id") or ""
            self._receive(frames[0].bytes, user, [f.buffer for f in frames[1:]])

    def _receive(self, identity: bytes, user: str, body: list) -> None:
        """Answer at once (ping, errors, a repeated request) or queue the request for its session."""
        envelope = [b""] if body and len(body[0]) == 0 else []  # a REQ client's delimiter, echoed back
        body = body[len(envelope) :]
        self.requests += 1
        request_id = None
        try:
            header, tensors = decode(body, self.max_message_bytes)
            request_id = header.get("id")
            if not (_integer(request_id, 0) and request_id < 2**63):
                request_id = None
                raise ProtocolError("malformed", "a request needs an integer id >= 0")
            if header.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(
                    "malformed",
                    f"protocol version {short(header.get('v'))} is not {PROTOCOL_VERSION} "
                    "(client and server of different astraora versions?)",
                )
            op = header.get("op")
            if not isinstance(op, str) or op not in self.OPS:
                raise ProtocolError("malformed", f"unknown op {short(op)}; allowed: {sorted(self.OPS)}")
            if op == "ping":
                self._send([identity, *envelope, *self._ok(request_id, {"identity": self.description})])
                return
            self._enqueue(identity, envelope, user, request_id, op, header, tensors)
        except ProtocolError as err:
            self._refuse(err)
            self._send([identity, *envelope, *self._error(request_id, err.code, str(err))])

    def _refuse(self, err: ProtocolError) -> None:
        self.refused += 1
        self.bad_log.warning("refused a request (%s): %s", err.code, err)

    def _enqueue(
        self, identity: bytes, envelope: list, user: str, request_id: int, op: str, header: dict, tensors: dict
    ) -> None:
        sid = header.get("session")
        if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
            raise ProtocolError("malformed", "a request needs a session id of 16-64 lowercase hex digits")
        with self._lock:
            session = self.sessions.get((user, sid))
            new = session is None
            if new:
                if op != "open":
                    raise ProtocolError(
                        "unknown_handle",
                        "no such session on this server (it restarted, or the session "
                        "expired after server.session_idle_s); open the layer again",
                    )
                if len(self.sessions) >= self.limits.max_sessions:
                    raise ProtocolError(
                        "refused",
                        f"the server holds {len(self.sessions)} sessions, its limit "
                        "(server.max_sessions); try again later",
                    )
                session = Session((user, sid))
            session.last_seen = time.monotonic()
            signature = _signature(header)
            known = session.replies.get(request_id) or session.waiting.get(request_id)
            if known is not None and known[0] != signature:
                raise ProtocolError("malformed", f"request id {request_id} was already used for another request")
            if (
                request_id in session.replies
            ):  # a retry of a request already answered: the same reply, nothing run again
                self._send([identity, *envelope, *session.replies[request_id][1]])
                return
            if request_id in session.waiting:  # a retry of a request queued or running: answer both
                session.waiting[request_id][1].append((identity, envelope))
                return
            if len(session.queue) >= MAX_QUEUED:
                raise ProtocolError("refused", f"this session already has {len(session.queue)} requests waiting")
            if op == "open":
                session.reserved[request_id] = self._admit_open(session, header)
            if new:
                self.sessions[session.key] = session
            session.waiting[request_id] = (signature, [(identity, envelope)])
            session.queue.append((request_id, op, header, tensors))
            if not session.busy:
                session.busy = True
                self._pool.submit(self._work, session)

    def _admit_open(self, session: Session, header: dict) -> int:
        """Check an ``open`` against the limits before any work: the entries it reserves."""
        d_in, d_out, seed, name = (header.get(k) for k in ("d_in", "d_out", "seed", "name"))
        if not all(_integer(v, 0) and v < 2**63 for v in (d_in, d_out, seed)):
            raise ProtocolError("malformed", "open needs integers d_in, d_out, seed in [0, 2**63)")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ProtocolError("malformed", "open needs a layer name of 1-200 characters")
        width = self.limits.max_width
        if width is not None and not (1 <= d_in <= width and 1 <= d_out <= width):
            raise ProtocolError(
                "refused",
                f"layer {short(name)} asked for d_in={d_in}, d_out={d_out}; "
                f"this server builds 1..{width} (server.max_width)",
            )
        entries = d_in * d_out
        limits = self.limits
        if session.layer_count >= limits.session_max_layers:
            raise ProtocolError(
                "refused", f"this session holds {session.layer_count} layers, its limit (server.session_max_layers)"
            )
        if session.entries + entries > limits.session_max_entries:
            raise ProtocolError(
                "too_large",
                f"layer {short(name)} ({d_out}x{d_in}) would take this session over "
                f"{limits.session_max_entries} matrix entries (server.session_max_entries)",
            )
        held = [s for s in self.sessions.values()]
        if sum(s.layer_count for s in held) >= limits.max_layers:
            raise ProtocolError(
                "refused",
                f"the server holds {limits.max_layers} layers, its limit (server.max_layers); try again later",
            )
        if sum(s.entries for s in held) + entries > limits.max_entries:
            raise ProtocolError(
                "too_large",
                f"layer {short(name)} ({d_out}x{d_in}) would take the server over "
                f"{limits.max_entries} matrix entries (server.max_entries)",
            )
        return entries

    def _work(self, session: Session) -> None:
        """A worker thread: run the session's queued requests in order."""
        while True:
            with self._lock:
                if not session.queue:
                    session.busy = False
                    if not session.layers and not session.reserved and self.sessions.get(session.key) is session:
                        del self.sessions[session.key]  # nothing left to keep
                    return
                request_id, op, header, tensors = session.queue.popleft()
            frames = self._execute(session, request_id, op, header, tensors)
            with self._lock:
                signature, targets = session.waiting.pop(request_id, ("", []))
                session.replies[request_id] = (signature, frames)
                while len(session.replies) > CACHED_REPLIES:
                    session.replies.popitem(last=False)
                session.last_seen = time.monotonic()
            for identity, envelope in targets:
                self._send([identity, *envelope, *frames])

    def _execute(self, session: Session, request_id: int, op: str, header: dict, tensors: dict) -> list:
        """The reply frames for one request. Never raises."""
        try:
            fields, out = self.OPS[op](self, session, request_id, header, tensors)
            return self._ok(request_id, fields, out)
        except ProtocolError as err:
            self._refuse(err)
            return self._error(request_id, err.code, str(err))
        except DeviceFault as err:
            return self._error(request_id, "fault", short(str(err), 500))
        except Exception as err:  # a lab driver's bug must not take the server down
            self.bad_log.warning("device error in %s: %s", op, short(err, 300), exc_info=True)
            return self._error(request_id, "internal", f"{type(err).__name__}: {short(str(err), 300)}")
        finally:
            with self._lock:
                session.reserved.pop(request_id, None)

    @staticmethod
    def _ok(request_id, fields: dict, tensors: dict | None = None) -> list:
        return encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}, tensors)

    @staticmethod
    def _error(request_id, code: str, message: str) -> list:
        return encode(
            {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}
        )

    def _expire(self, now: float) -> None:
        with self._lock:
            for key, session in list(self.sessions.items()):
                if not session.busy and not session.queue and now - session.last_seen > self.limits.session_idle_s:
                    del self.sessions[key]
                    self.expired += 1
                    log.info(
                        "closed a session idle for %.0f s (%d layers)", now - session.last_seen, len(session.layers)
                    )

    # ----------------------------------------------------------------- operations
    def _layer(self, session: Session, header: dict) -> Layer:
        handle = header.get("handle")
        if not isinstance(handle, str):
            raise ProtocolError("malformed", f"{header.get('op')} needs the layer's handle, a string")
        with self._lock:
            layer = session.layers.get(handle)
        if layer is None:
            raise ProtocolError(
                "unknown_handle",
                f"no open layer {short(handle)} in this session (the server may have restarted); open it again",
            )
        return layer

    def _serving(self, lab: LabDevice) -> _Serving:
        with self._lab_lock:
            serving = getattr(lab, "_astraora_serving", None)
            if serving is None:
                serving = lab._astraora_serving = _Serving()
                if not isinstance(lab, SimulatedDevice):
                    self._labs[id(lab)] = lab
            return serving

    def op_ping(self, session: Session, request_id: int, header: dict, tensors: dict):
        return {"identity": self.description}, {}

    def op_open(self, session: Session, request_id: int, header: dict, tensors: dict):
        d_in, d_out, seed, name = (header[k] for k in ("d_in", "d_out", "seed", "name"))
        lab = self.opener(d_in, d_out, seed, name)
        with self._serving(lab).lock:
            info = lab.info()
            theta = lab.initial_theta(seed, name)
            stateful = info.stateful if info.stateful is not None else bool(lab.state())
        if theta.numel() * theta.element_size() > self.max_message_bytes:
            raise ProtocolError(
                "too_large",
                f"layer {short(name)}: its θ of {theta.numel() * theta.element_size()} bytes "
                f"does not fit one message (server.max_message_mb)",
            )
        handle = secrets.token_hex(8)
        with self._lock:
            session.layers[handle] = Layer(handle, lab, info, session.reserved.pop(request_id))
        out = info.to_json()
        if self.max_rows is not None:
            out["max_rows"] = min(out["max_rows"] or self.max_rows, self.max_rows)
        out["max_message_bytes"] = self.max_message_bytes
        out["stateful"] = bool(stateful)
        return {"handle": handle, "info": out}, {"theta": theta}

    def op_close(self, session: Session, request_id: int, header: dict, tensors: dict):
        layer = self._layer(session, header)
        with self._lock:
            session.layers.pop(layer.handle, None)
        return {}, {}

    def op_program(self, session: Session, request_id: int, header: dict, tensors: dict):
        layer = self._layer(session, header)
        theta = tensors.get("theta")
        self._check_setting(layer.info, theta, "theta", batched=False)
        serving = self._serving(layer.lab)
        with serving.lock:
            self._delay()
            self._program(layer.lab, serving, theta)
        return {}, {}

    def op_query(self, session: Session, request_id: int, header: dict, tensors: dict):
        layer = self._layer(session, header)
        info, lab = layer.info, layer.lab
        purpose = header.get("purpose", "forward")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise ProtocolError("malformed", f"purpose {short(purpose)} is not one of {list(PURPOSES)}")
        unknown = set(tensors) - {"x", "theta", "live"}
        if unknown:
            raise ProtocolError("malformed", f"query takes tensors x, theta, live; got {sorted(unknown)}")
        x, theta, live = tensors.get("x"), tensors.get("theta"), tensors.get("live")
        if (
            x is None
            or x.dtype != DTYPES[info.dtype]
            or x.dim() not in (2, 3)
            or x.shape[-1] != info.d_in
            or x.shape[-2] < 1
        ):
            raise ProtocolError(
                "malformed",
                f"query needs rows x of {info.dtype}, shape (B, {info.d_in}) or (K, B, {info.d_in}), B >= 1",
            )
        limit = min(r for r in (info.max_rows, self.max_rows, math.inf) if r is not None)
        if x.shape[-2] > limit:
            raise ProtocolError("too_large", f"{x.shape[-2]} rows in one call; this device takes at most {limit}")
        if not _finite(x):
            raise ProtocolError("malformed", "query rows x must be finite")
        batched = theta is not None and theta.dim() == len(info.theta_shape) + 1
        if theta is not None:
            self._check_setting(info, theta, "theta", batched=batched)
        if x.dim() == 3 and (not batched or x.shape[0] != theta.shape[0]):
            raise ProtocolError("malformed", "rows x (K, B, n) need K settings theta (K, *theta_shape)")
        if live is not None:
            self._check_setting(info, live, "live", batched=False)
        serving = self._serving(lab)
        with serving.lock:
            if theta is None and serving.programmed is None:
                raise ProtocolError("not_programmed", "query without theta, but nothing was programmed yet")
            self._delay()
            if live is not None:
                lab.track(live)
            if batched:
                y = lab.sweep(x, theta, purpose)
                serving.programmed = theta[-1]
            else:
                if theta is not None:
                    self._program(lab, serving, theta)
                y = lab.measure(x, purpose)
        expected = (
            (*x.shape[:-1], info.d_out) if not batched or x.dim() == 3 else (theta.shape[0], x.shape[0], info.d_out)
        )
        if tuple(y.shape) != expected or y.dtype != x.dtype:
            raise RuntimeError(f"the device returned {y.dtype} {list(y.shape)}, not {x.dtype} {list(expected)}")
        return {}, {"y": y}

    def op_step(self, session: Session, request_id: int, header: dict, tensors: dict):
        layer = self._layer(session, header)
        with self._serving(layer.lab).lock:
            layer.lab.step()
        return {}, {}

    def op_get_state(self, session: Session, request_id: int, header: dict, tensors: dict):
        layer = self._layer(session, header)
        with self._serving(layer.lab).lock:
            return {}, layer.lab.state()

    def op_set_state(self, session: Session, request_id: int, header: dict, tensors: dict):
        """All or nothing: the device checks everything before it sets anything; should it change
        something and then refuse, the state from before is put back."""
        layer = self._layer(session, header)
        with self._serving(layer.lab).lock:
            before = layer.lab.state()
            if set(tensors) != set(before):
                raise ProtocolError(
                    "malformed", f"set_state: the state must hold {sorted(before)}, got {sorted(tensors)}"
                )
            try:
                layer.lab.load_state(tensors)
            except Exception as err:
                try:
                    layer.lab.load_state(before)
                except Exception:
                    log.error("set_state: the device refused its own previous state; its state may have changed")
                raise ProtocolError("malformed", f"set_state: {short(str(err), 300)}") from None
        return {}, {}

    OPS = {
        "ping": op_ping,
        "open": op_open,
        "close": op_close,
        "program": op_program,
        "query": op_query,
        "step": op_step,
        "get_state": op_get_state,
        "set_state": op_set_state,
    }

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _program(lab: LabDevice, serving: _Serving, theta: Tensor) -> None:
        if serving.programmed is None or not torch.equal(
            serving.programmed, theta
        ):  # a real chip is reprogrammed only on change
            lab.program(theta)
            serving.programmed = theta

    @staticmethod
    def _check_setting(info: DeviceInfo, theta: Tensor | None, name: str, batched: bool) -> None:
        shape = tuple(info.theta_shape)
        ok = (
            theta is not None
            and theta.dtype == DTYPES[info.dtype]
            and (tuple(theta.shape[1:]) == shape and theta.shape[0] >= 1 if batched else tuple(theta.shape) == shape)
        )
        if not ok:
            want = f"(K, {', '.join(map(str, shape))})" if batched else str(list(shape))
            raise ProtocolError("malformed", f"{name} must be {info.dtype} of shape {want}")
        if not _finite(theta):
            raise ProtocolError("malformed", f"{name} must be finite")

    def _delay(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


def _signature(header: dict) -> str:
    """What a retried request must repeat: its header without the id (the tensors' specs included)."""
    return json.dumps({k: v for k, v in header.items() if k != "id"}, sort_keys=True)


def _finite(t: Tensor) -> bool:
    return not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t).all())


# --------------------------------------------------------------------- from a config
def device_opener(device_cfg, max_width: int) -> tuple[Opener, str]:
    """The opener for ``device_cfg`` (a ``conf/device`` entry) and a description of it."""
    from astraora.build import device_spec, instantiate, make_device

    family = device_cfg.get("family")
    if family in NOT_SERVABLE:
        raise ConfigError(f"device={family} cannot be served; choose a simulator or a LabDevice subclass.")
    target = str(device_cfg.get("_target_"))
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"device._target_={target!r} does not name an importable class.") from None

    if isinstance(cls, type) and issubclass(cls, LabDevice):
        lab = instantiate(device_spec(device_cfg), _convert_="all")
        info = lab.info()

        def open_lab(d_in: int, d_out: int, seed: int, layer: str) -> LabDevice:
            if (d_in, d_out) != (info.d_in, info.d_out):
                raise ProtocolError(
                    "refused",
                    f"this server's device {info.identity!r} is fixed at d_in={info.d_in}, "
                    f"d_out={info.d_out}; layer {layer!r} asked for d_in={d_in}, d_out={d_out}",
                )
            return lab

        return open_lab, info.identity

    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise ConfigError(f"device._target_={target!r} is neither an astraora Device nor a LabDevice subclass.")

    def open_simulator(d_in: int, d_out: int, seed: int, layer: str) -> LabDevice:
        if not (1 <= d_in <= max_width and 1 <= d_out <= max_width):
            raise ProtocolError(
                "refused",
                f"layer {layer!r} asked for d_in={d_in}, d_out={d_out}; "
                f"this server builds 1..{max_width} (server.max_width)",
            )
        try:
            return SimulatedDevice(make_device(device_cfg, d_in, d_out, seed, layer), family)
        except AstraoraError as err:
            raise ProtocolError("refused", str(err)) from None

    make_device(device_cfg, 2, 2, 0, "config-check")  # a bad device option stops the server now, not at open
    return open_simulator, f"simulator {family} ({target})"


def _integer(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number(value, positive: bool) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)


SERVER_RULES = {  # key → (accepts, what is allowed)
    "max_message_mb": (lambda v: _number(v, positive=True), "a number > 0"),
    "delay_s": (lambda v: _number(v, positive=False), "a number >= 0"),
    "max_rows": (lambda v: v is None or _integer(v, 1), "null or an integer >= 1"),
    "max_width": (lambda v: _integer(v, 1), "an integer >= 1"),
    "threads": (lambda v: _integer(v, 1), "an integer >= 1"),
    "workers": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_sessions": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_layers": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_entries": (lambda v: _integer(v, 1), "an integer >= 1"),
    "session_max_layers": (lambda v: _integer(v, 1), "an integer >= 1"),
    "session_max_entries": (lambda v: _integer(v, 1), "an integer >= 1"),
    "session_idle_s": (lambda v: _number(v, positive=True), "a number > 0"),
    "handshake_s": (lambda v: _number(v, positive=True) and v <= 60, "a number in (0, 60]"),
    "heartbeat_s": (lambda v: _number(v, positive=True), "a number > 0"),
    "heartbeat_timeout_s": (lambda v: _number(v, positive=True), "a number > 0"),
    "log_per_minute": (lambda v: _integer(v, 1), "an integer >= 1"),
    "token_file": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a file"),
    "key_file": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a .key_secret file"),
    "client_keys_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a folder of .key files"),
}


def check_server_config(cfg) -> None:
    server = cfg.server
    if "token" in server:
        raise ConfigError(
            "server.token is not allowed: a config is no place for a secret; set $ASTRAORA_DEVICE_TOKEN "
            "or server.token_file."
        )
    address = server.address
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"server.address={address!r} must be a tcp:// or ipc:// endpoint, e.g. tcp://127.0.0.1:5555.")
    for key, (accepts, allowed) in SERVER_RULES.items():
        if key not in server:
            raise ConfigError(f"server.{key} is missing; it must be {allowed} (see conf/server.yaml).")
        if not accepts(server[key]):
            raise ConfigError(f"server.{key}={server[key]!r} is not allowed; it must be {allowed}.")
    if server.heartbeat_timeout_s <= server.heartbeat_s:
        raise ConfigError(
            f"server.heartbeat_timeout_s={server.heartbeat_timeout_s} must exceed "
            f"server.heartbeat_s={server.heartbeat_s}."
        )


def build_server(cfg) -> DeviceServer:
    """A :class:`DeviceServer` from the ``server`` config (conf/server.yaml)."""
    check_server_config(cfg)
    server = cfg.server
    keys = ServerKeys.from_config(server.key_file, server.client_keys_dir, server.token_file)
    opener, description = device_opener(cfg.device, int(server.max_width))
    limits = Limits(
        max_sessions=server.max_sessions,
        max_layers=server.max_layers,
        max_entries=server.max_entries,
        session_max_layers=server.session_max_layers,
        session_max_entries=server.session_max_entries,
        max_width=int(server.max_width),
        session_idle_s=float(server.session_idle_s),
    )
    return DeviceServer(
        opener,
        keys=keys,
        address=server.address,
        max_message_bytes=int(server.max_message_mb * MIB),
        delay_s=float(server.delay_s),
        max_rows=server.max_rows,
        limits=limits,
        workers=int(server.workers),
        handshake_s=float(server.handshake_s),
        heartbeat_s=float(server.heartbeat_s),
        heartbeat_timeout_s=float(server.heartbeat_timeout_s),
        log_per_minute=int(server.log_per_minute),
        description=description,
    )


def is_loopback(endpoint: str) -> bool:
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return endpoint.startswith("ipc://") or host in ("127.0.0.1", "localhost", "::1")


def serve_from_config(cfg) -> None:
    torch.set_num_threads(int(cfg.server.threads))  # one thread: the same arithmetic as a 1-thread trainer
    server = build_server(cfg)
    endpoint = server.bind()
    if not is_loopback(endpoint):
        log.warning(
            "listening beyond this machine on %s: whoever holds the token (or an authorized key) can use "
            "the device; traffic is encrypted and authenticated (CurveZMQ)",
            endpoint,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    delay = f", adding {cfg.server.delay_s} s per call" if cfg.server.delay_s else ""
    keys = "authorized key files" if server.keys.per_client else "keys from the shared token"
    print(f"astraora-device-server: serving {server.description} on {endpoint}{delay} (CurveZMQ, {keys})", flush=True)
    try:
        server.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print(
            f"astraora-device-server: stopped after {server.requests} requests ({server.refused} refused, "
            f"{server.denied} connections refused at the handshake)",
            flush=True,
        )


def check_device_override(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """``device=<name>`` must name a servable entry of the device group Hydra will compose from: astraora's
    conf/device, and a lab's own conf/device/<chip>.yaml added with ``hydra.searchpath`` or ``--config-dir``.
    One line listing them and exit 2 otherwise."""
    sources, argv = config_sources(argv, config_dir, config_name="server")
    chosen = [arg.partition("=")[2] for arg in argv if arg.partition("=")[0] == "device" and "=" in arg]
    if sources is None or not chosen:
        return
    allowed = [name for name in group_options(["device"], argv, sources)["device"] if name not in NOT_SERVABLE]
    for value in chosen:
        if value not in allowed:
            print(f"error: device={value} is not allowed; choose one of {allowed}.", file=sys.stderr)
            sys.exit(2)


def main() -> None:
    import hydra

    @hydra.main(config_path=CONFIG_DIR, config_name="server", version_base="1.3")
    def hydra_main(cfg) -> None:
        try:
            serve_from_config(cfg)
        except AstraoraError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    check_device_override(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
