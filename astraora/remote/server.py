"""``astraora-device-server``: one device served over the network (docs/PROTOCOL.md).

    ASTRAORA_DEVICE_TOKEN=... astraora-device-server device=mzi server.address=tcp://127.0.0.1:5555

The server answers one request at a time on a ZeroMQ ROUTER socket. Every request must carry the
shared token; anything malformed, unauthenticated or too big gets an error reply and changes
nothing. For a simulator (``device=mzi``, ``mrr``, ...) it builds, per ``open``, the layer the
client asks for (shape, seed and name), so the client sees exactly the device it would have built
in-process; a :class:`~astraora.remote.lab.LabDevice` has one shape and refuses others.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import math
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import zmq
from torch import Tensor

from astraora.devices.base import Device
from astraora.errors import AstraoraError, ConfigError, DeviceFault
from astraora.remote.lab import PURPOSES, DeviceInfo, LabDevice, SimulatedDevice
from astraora.remote.token import read_token
from astraora.remote.wire import DTYPES, PROTOCOL_VERSION, ProtocolError, decode, encode

log = logging.getLogger("astraora.server")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
MIB = 2**20
NOT_SERVABLE = ("digital", "remote")

Opener = Callable[[int, int, int, str], LabDevice]


class Session:
    """One opened layer: its device and the setting it holds."""

    def __init__(self, lab: LabDevice):
        self.lab = lab
        self.info: DeviceInfo = lab.info()


class DeviceServer:
    """Serves the devices ``opener(d_in, d_out, seed, name)`` returns.

    Args:
        opener: builds (simulator) or hands out (lab device) the device for an ``open`` request;
            raises :class:`ProtocolError` (code ``refused``) for a shape it cannot serve.
        token: the shared secret every request must carry.
        address: a ZeroMQ endpoint; ``tcp://127.0.0.1:*`` picks a free port (see :attr:`endpoint`).
        max_message_bytes: the largest request accepted (and the frame size ZeroMQ lets in at all).
        delay_s: extra latency added to every program/query call, to rehearse a slow chip.
        max_rows: rows per call, on top of the device's own limit (None: the device's).
        max_devices: simulator layers held at once; the least recently used is dropped beyond it.
        description: what is served, for the log line.
    """

    def __init__(self, opener: Opener, token: str, *, address: str = "tcp://127.0.0.1:5555",
                 max_message_bytes: int = 64 * MIB, delay_s: float = 0.0, max_rows: int | None = None,
                 max_devices: int = 64, description: str = "device"):
        self.opener, self._token = opener, token.encode()
        self.address, self.max_message_bytes = address, int(max_message_bytes)
        self.delay_s, self.max_rows, self.max_devices = float(delay_s), max_rows, int(max_devices)
        self.description = description
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._programmed: dict[int, Tensor] = {}  # id(lab) → the setting it holds
        self._labs: dict[int, LabDevice] = {}
        self.socket: zmq.Socket | None = None
        self.endpoint: str | None = None
        self.requests = 0
        self.refused = 0

    # ----------------------------------------------------------------- transport
    def bind(self) -> str:
        """Open the listening socket; returns the bound endpoint (with the port chosen for ``:*``)."""
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)  # bigger frames: peer dropped
        try:
            self.socket.bind(self.address)
        except zmq.ZMQError as err:
            self.socket.close()
            raise ConfigError(f"server.address={self.address} cannot be bound ({err}).") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 100) -> None:
        """Answer requests until ``stop`` is set (or forever)."""
        if self.socket is None:
            self.bind()
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(poll_ms):
                continue
            frames = self.socket.recv_multipart(copy=True)
            if len(frames) < 2:
                continue  # no routing identity: nothing to answer
            reply = self.handle(frames[1:])
            self.socket.send_multipart([frames[0], *reply], copy=False)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        for lab in self._labs.values():
            lab.close()

    # ----------------------------------------------------------------- one request
    def handle(self, body: list[bytes]) -> list:
        """The reply frames for one request (after the routing identity). Never raises."""
        envelope = [b""] if body and body[0] == b"" else []  # a REQ client's delimiter, echoed back
        body = body[len(envelope):]
        self.requests += 1
        request_id = None
        try:
            header, tensors = decode(body, self.max_message_bytes)
            request_id = header.get("id") if isinstance(header.get("id"), int) else None
            token = header.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
                raise ProtocolError("auth", "unauthenticated request refused (wrong or missing token)")
            if header.get("v") != PROTOCOL_VERSION:
                raise ProtocolError("malformed", f"protocol version {header.get('v')!r} is not {PROTOCOL_VERSION}")
            op = header.get("op")
            handler = self.OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError("malformed", f"unknown op {op!r}; allowed: {sorted(self.OPS)}")
            fields, out = handler(self, header, tensors)
            return [*envelope, *encode({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}, out)]
        except ProtocolError as err:
            self.refused += 1
            log.warning("refused a request (%s): %s", err.code, err)
            return self._error(envelope, request_id, err.code, str(err))
        except DeviceFault as err:
            return self._error(envelope, request_id, "fault", str(err))
        except Exception as err:  # a lab driver's bug must not take the server down
            log.exception("device error")
            return self._error(envelope, request_id, "internal", f"{type(err).__name__}: {err}")

    @staticmethod
    def _error(envelope: list, request_id, code: str, message: str) -> list:
        header = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}
        return [*envelope, *encode(header)]

    # ----------------------------------------------------------------- operations
    def _session(self, header: dict) -> Session:
        handle = header.get("handle")
        session = self.sessions.get(handle) if isinstance(handle, str) else None
        if session is None:
            raise ProtocolError("unknown_handle", f"no open device {handle!r} (the server may have restarted); open it again")
        self.sessions.move_to_end(handle)
        return session

    def op_ping(self, header: dict, tensors: dict):
        return {"identity": self.description}, {}

    def op_open(self, header: dict, tensors: dict):
        request = {k: header.get(k) for k in ("d_in", "d_out", "seed")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in request.values()):
            raise ProtocolError("malformed", "open needs integers d_in, d_out, seed >= 0")
        name = header.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ProtocolError("malformed", "open needs a layer name of 1-200 characters")
        lab = self.opener(request["d_in"], request["d_out"], request["seed"], name)
        self._labs[id(lab)] = lab
        handle = secrets.token_hex(8)
        session = self.sessions[handle] = Session(lab)
        while len(self.sessions) > self.max_devices:
            _, dropped = self.sessions.popitem(last=False)
            if all(s.lab is not dropped.lab for s in self.sessions.values()):
                self._labs.pop(id(dropped.lab), None)
                self._programmed.pop(id(dropped.lab), None)
        info = session.info.to_json()
        if self.max_rows is not None:
            info["max_rows"] = min(info["max_rows"] or self.max_rows, self.max_rows)
        info["max_message_bytes"] = self.max_message_bytes
        return {"handle": handle, "info": info}, {"theta": lab.initial_theta(request["seed"], name)}

    def op_close(self, header: dict, tensors: dict):
        session = self._session(header)
        del self.sessions[header["handle"]]
        if all(s.lab is not session.lab for s in self.sessions.values()):
            self._labs.pop(id(session.lab), None)
            self._programmed.pop(id(session.lab), None)
        return {}, {}

    def op_program(self, header: dict, tensors: dict):
        session = self._session(header)
        theta = tensors.get("theta")
        self._check_setting(session.info, theta, "theta", batched=False)
        self._delay()
        self._program(session.lab, theta)
        return {}, {}

    def op_query(self, header: dict, tensors: dict):
        session = self._session(header)
        info, lab = session.info, session.lab
        purpose = header.get("purpose", "forward")
        if purpose not in PURPOSES:
            raise ProtocolError("malformed", f"purpose {purpose!r} is not one of {list(PURPOSES)}")
        unknown = set(tensors) - {"x", "theta", "live"}
        if unknown:
            raise ProtocolError("malformed", f"query takes tensors x, theta, live; got {sorted(unknown)}")
        x, theta, live = tensors.get("x"), tensors.get("theta"), tensors.get("live")
        if x is None or x.dtype != DTYPES[info.dtype] or x.dim() not in (2, 3) or x.shape[-1] != info.d_in or x.shape[-2] < 1:
            raise ProtocolError("malformed", f"query needs rows x of {info.dtype}, shape (B, {info.d_in}) or (K, B, {info.d_in}), B >= 1")
        limit = min(r for r in (info.max_rows, self.max_rows, math.inf) if r is not None)
        if x.shape[-2] > limit:
            raise ProtocolError("too_large", f"{x.shape[-2]} rows in one call; this device takes at most {limit}")
        batched = theta is not None and theta.dim() == len(info.theta_shape) + 1
        if theta is not None:
            self._check_setting(info, theta, "theta", batched=batched)
        elif id(lab) not in self._programmed:
            raise ProtocolError("not_programmed", "query without theta, but nothing was programmed yet")
        if x.dim() == 3 and (not batched or x.shape[0] != theta.shape[0]):
            raise ProtocolError("malformed", "rows x (K, B, n) need K settings theta (K, *theta_shape)")
        if live is not None:
            self._check_setting(info, live, "live", batched=False)
        self._delay()
        if live is not None:
            lab.track(live)
        if batched:
            y = lab.sweep(x, theta, purpose)
            self._programmed[id(lab)] = theta[-1]
        else:
            if theta is not None:
                self._program(lab, theta)
            y = lab.measure(x, purpose)
        expected = (*x.shape[:-1], info.d_out) if not batched or x.dim() == 3 else (theta.shape[0], x.shape[0], info.d_out)
        if tuple(y.shape) != expected or y.dtype != x.dtype:
            raise RuntimeError(f"the device returned {y.dtype} {list(y.shape)}, not {x.dtype} {list(expected)}")
        return {}, {"y": y}

    def op_step(self, header: dict, tensors: dict):
        self._session(header).lab.step()
        return {}, {}

    def op_get_state(self, header: dict, tensors: dict):
        return {}, self._session(header).lab.state()

    def op_set_state(self, header: dict, tensors: dict):
        session = self._session(header)
        try:
            session.lab.load_state(tensors)
        except ValueError as err:
            raise ProtocolError("malformed", f"set_state: {err}") from None
        return {}, {}

    OPS = {"ping": op_ping, "open": op_open, "close": op_close, "program": op_program, "query": op_query,
           "step": op_step, "get_state": op_get_state, "set_state": op_set_state}

    # ----------------------------------------------------------------- helpers
    def _program(self, lab: LabDevice, theta: Tensor) -> None:
        held = self._programmed.get(id(lab))
        if held is None or not torch.equal(held, theta):  # a real chip is reprogrammed only on change
            lab.program(theta)
            self._programmed[id(lab)] = theta

    @staticmethod
    def _check_setting(info: DeviceInfo, theta: Tensor | None, name: str, batched: bool) -> None:
        shape = tuple(info.theta_shape)
        ok = (theta is not None and theta.dtype == DTYPES[info.dtype]
              and (tuple(theta.shape[1:]) == shape and theta.shape[0] >= 1 if batched else tuple(theta.shape) == shape))
        if not ok:
            want = f"(K, {', '.join(map(str, shape))})" if batched else str(list(shape))
            raise ProtocolError("malformed", f"{name} must be {info.dtype} of shape {want}")

    def _delay(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


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
                raise ProtocolError("refused", f"this server's device {info.identity!r} is fixed at d_in={info.d_in}, "
                                               f"d_out={info.d_out}; layer {layer!r} asked for d_in={d_in}, d_out={d_out}")
            return lab

        return open_lab, info.identity

    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise ConfigError(f"device._target_={target!r} is neither an astraora Device nor a LabDevice subclass.")

    def open_simulator(d_in: int, d_out: int, seed: int, layer: str) -> LabDevice:
        if not (1 <= d_in <= max_width and 1 <= d_out <= max_width):
            raise ProtocolError("refused", f"layer {layer!r} asked for d_in={d_in}, d_out={d_out}; "
                                           f"this server builds 1..{max_width} (server.max_width)")
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
    "max_devices": (lambda v: _integer(v, 1), "an integer >= 1"),
    "max_width": (lambda v: _integer(v, 1), "an integer >= 1"),
    "threads": (lambda v: _integer(v, 1), "an integer >= 1"),
}


def check_server_config(cfg) -> None:
    address = cfg.server.address
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"server.address={address!r} must be a tcp:// or ipc:// endpoint, e.g. tcp://127.0.0.1:5555.")
    for key, (accepts, allowed) in SERVER_RULES.items():
        if not accepts(cfg.server[key]):
            raise ConfigError(f"server.{key}={cfg.server[key]!r} is not allowed; it must be {allowed}.")


def build_server(cfg) -> DeviceServer:
    """A :class:`DeviceServer` from the ``server`` config (conf/server.yaml)."""
    check_server_config(cfg)
    server = cfg.server
    token = read_token(server.token_file, "server.token_file")
    opener, description = device_opener(cfg.device, int(server.max_width))
    return DeviceServer(opener, token, address=server.address, max_message_bytes=int(server.max_message_mb * MIB),
                        delay_s=float(server.delay_s), max_rows=server.max_rows, max_devices=int(server.max_devices),
                        description=description)


def is_loopback(endpoint: str) -> bool:
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return endpoint.startswith("ipc://") or host in ("127.0.0.1", "localhost", "::1")


def serve_from_config(cfg) -> None:
    torch.set_num_threads(int(cfg.server.threads))  # one thread: the same arithmetic as a 1-thread trainer
    server = build_server(cfg)
    endpoint = server.bind()
    if not is_loopback(endpoint):
        log.warning("listening beyond this machine on %s: the token travels unencrypted, use a trusted network or a tunnel", endpoint)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    delay = f", adding {cfg.server.delay_s} s per call" if cfg.server.delay_s else ""
    print(f"astraora-device-server: serving {server.description} on {endpoint}{delay}", flush=True)
    try:
        server.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print(f"astraora-device-server: stopped after {server.requests} requests ({server.refused} refused)", flush=True)


def check_device_override(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """``device=<name>`` must name a file in conf/device: one line and exit 2 otherwise (unless
    ``hydra.searchpath`` adds config directories, e.g. a lab's own conf/device/<chip>.yaml)."""
    if any(arg.startswith("hydra.searchpath") for arg in argv):
        return
    allowed = sorted(p.stem for p in Path(config_dir, "device").glob("*.yaml") if p.stem not in NOT_SERVABLE)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "device" and sep and value not in allowed:
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
