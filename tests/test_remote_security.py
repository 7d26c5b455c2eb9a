"""The device server's security: CURVE authentication at the handshake, sessions that isolate
clients, limits that refuse instead of evicting, idempotent retries, atomic set_state, malformed
input, rate-limited logs, a dead server noticed in seconds, and a socket loop that stays responsive."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import torch
from conftest import compose_config
from test_remote import OPEN_S, TOKEN, client, peer, raw_request, request_header, server_config, serving, token_env  # noqa: F401
from torch import Tensor

from astraora.build import make_device
from astraora.errors import ConfigError, DeviceFailure, DeviceFault
from astraora.ledger import QueryLedger
from astraora.remote import DeviceInfo, DeviceServer, LabDevice, RemoteDevice
from astraora.remote.keys import ClientKeys, ServerKeys
from astraora.remote.keys import main as make_keys
from astraora.remote.server import Limits, RateLimitedLog, build_server, device_opener
from astraora.remote.wire import encode

NOISY = ["device=slm", "device.nonideal.output_noise=0.1"]


def simulator_server(*overrides: str, **kwargs) -> DeviceServer:
    """A DeviceServer of conf/device/<...> simulators with the given keyword arguments."""
    opener, description = device_opener(server_config(*overrides).device, max_width=64)
    return DeviceServer(opener, TOKEN, address="tcp://127.0.0.1:*", description=description, **kwargs)


def reference(*overrides: str, d_in: int = 6, d_out: int = 4, name: str = "layer"):
    return make_device(server_config(*overrides).device, d_in, d_out, 0, name)


# --------------------------------------------------------------------------- authentication
def test_a_wrong_token_is_refused_at_the_handshake_with_one_line_in_seconds():
    with serving("device=slm") as server:
        start = time.monotonic()
        with pytest.raises(ConfigError) as info:
            client(server, secret="another-token-123")
        assert time.monotonic() - start < 2  # not open_timeout_s (OPEN_S)
        message = str(info.value)
        assert message == (
            f"device server {server.endpoint} refused this client's key at the handshake (wrong ASTRAORA_DEVICE_TOKEN?)"
        )
        assert "another-token-123" not in message and TOKEN not in message
        assert server.requests == 0 and server.denied >= 1


def test_an_unauthenticated_peer_gets_nothing_through_and_is_dropped():
    with serving("device=slm") as server:
        frames = encode(request_header("open", d_in=6, d_out=4, seed=0, name="layer"))
        assert raw_request(server.endpoint, frames, timeout_s=0.5, token=None) is None  # plain ZeroMQ
        assert raw_request(server.endpoint, frames, timeout_s=0.5, token="another-token-123") is None  # wrong key
        assert server.requests == 0 and not server.sessions
        assert raw_request(server.endpoint, frames)["ok"]  # the same request with the keys


def test_a_peer_that_never_completes_the_handshake_is_dropped_after_handshake_s():
    server = simulator_server("device=slm", handshake_s=0.5)
    with serving(server=server):
        port = int(server.endpoint.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            # a ZMTP 3.0 greeting announcing CURVE, then nothing: the server must not wait forever
            raw.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" * 32)
            raw.settimeout(5)
            start = time.monotonic()
            with pytest.raises(ConnectionResetError):
                while raw.recv(4096):
                    pass
                raise ConnectionResetError  # closed cleanly: the same for this test
            assert time.monotonic() - start < 3


def test_per_client_key_files_bind_sessions_to_the_key(tmp_path, capsys):
    make_keys([str(tmp_path / "server"), "server"])
    for name in ("alice", "bob", "mallory"):
        make_keys([str(tmp_path / name), name])
    clients = tmp_path / "clients"
    clients.mkdir()
    for name in ("alice", "bob"):
        (clients / f"{name}.key").write_text((tmp_path / name / f"{name}.key").read_text())
    assert "secret key" in capsys.readouterr().out
    cfg = server_config(
        "device=slm", f"server.key_file={tmp_path}/server/server.key_secret", f"server.client_keys_dir={clients}"
    )
    server_key = str(tmp_path / "server" / "server.key")

    def keyed(server, name: str, **kwargs) -> RemoteDevice:
        return client(server, key_file=str(tmp_path / name / f"{name}.key_secret"), server_key=server_key, **kwargs)

    with serving(server=build_server(cfg)) as server:
        alice = keyed(server, "alice")
        x = torch.randn(2, 6)
        assert alice.query(x).shape == (2, 4)
        with pytest.raises(ConfigError, match="refused this client's key at the handshake .*client_keys_dir"):
            keyed(server, "mallory")
        bob = keyed(server, "bob", session=alice.connection.session)  # the same session id, another key
        for op in ("close", "get_state", "query"):
            with pytest.raises(DeviceFault, match="unknown_handle"):
                bob.connection.request(op, {"handle": alice.handle}, {"x": x} if op == "query" else None)
        assert len(server.sessions) == 2 and alice.query(x).shape == (2, 4)
        assert ServerKeys.from_config(None, None, None).per_client is False  # token mode: the env token
        keys = ClientKeys.from_token(TOKEN)
        assert keys.secret.decode() not in repr(keys) and TOKEN not in repr(keys)


def test_the_token_is_never_a_config_value(monkeypatch):
    cfg = compose_config(["device=remote", "+device.token=abcdefgh123"])
    with pytest.raises(ConfigError, match=r"device.token is not allowed.*\$ASTRAORA_DEVICE_TOKEN or device.token_file"):
        make_device(cfg.device, 4, 4, 0, "layer")
    with pytest.raises(ConfigError, match="server.token is not allowed"):
        build_server(server_config("+server.token=abcdefgh123"))
    with pytest.raises(ConfigError, match=r"server.session_max_layers=0 is not allowed; it must be an integer >= 1"):
        build_server(server_config("server.session_max_layers=0"))
    with pytest.raises(ConfigError, match="server.key_file=/nonexistent.key_secret is not a file"):
        build_server(server_config("server.key_file=/nonexistent.key_secret"))
    with pytest.raises(ConfigError, match="device.heartbeat_timeout_s=1 must exceed device.heartbeat_s=2"):
        RemoteDevice(4, 4, heartbeat_s=2, heartbeat_timeout_s=1)


# --------------------------------------------------------------------------- sessions and limits
def test_another_session_cannot_touch_a_layer_and_its_noise_stream_is_unchanged():
    with serving(*NOISY) as server:
        owner = client(server)
        other = client(server, session="cd" * 16)  # another token holder
        x = torch.randn(3, 6)
        ref = reference(*NOISY)
        torch.testing.assert_close(owner.query(x), ref.query(x), rtol=0, atol=0)
        state = {k: v.clone() for k, v in owner.generator_states().items()}
        attempts = [
            ("query", {"x": x, "theta": owner.theta.detach()}),
            ("set_state", state),
            ("get_state", None),
            ("step", None),
            ("program", {"theta": owner.theta.detach()}),
            ("close", None),
        ]
        for op, tensors in attempts:
            with pytest.raises(DeviceFault, match=r"\(unknown_handle\)"):
                other.connection.request(op, {"handle": owner.handle}, tensors)
        torch.testing.assert_close(owner.query(x), ref.query(x), rtol=0, atol=0)


def test_limits_are_refused_and_never_evict_a_live_layer():
    limits = Limits(max_layers=3, session_max_layers=2, session_max_entries=100, max_width=64)
    server = simulator_server(*NOISY, limits=limits)
    with serving(server=server):
        owner = client(server)
        x = torch.randn(2, 6)
        ref = reference(*NOISY)
        torch.testing.assert_close(owner.query(x), ref.query(x), rtol=0, atol=0)
        other = "cd" * 16
        client(server, session=other, name="a")
        client(server, session=other, name="b")
        with pytest.raises(ConfigError, match=r"\(refused\).*server.session_max_layers"):
            client(server, session=other, name="c")
        with pytest.raises(ConfigError, match=r"\(refused\).*server.max_layers"):
            client(server, session="ef" * 16, name="d")
        with pytest.raises(ConfigError, match=r"\(too_large\).*server.session_max_entries"):
            client(server, 20, 20, session="ab" * 16)
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"\(refused\).*server.max_width"):
            client(server, 4096, 4096, session="ab" * 16)
        assert time.monotonic() - start < 1
        torch.testing.assert_close(owner.query(x), ref.query(x), rtol=0, atol=0)  # still there, stream unchanged


def test_an_idle_session_expires_and_its_client_is_told():
    server = simulator_server(*NOISY, limits=Limits(session_idle_s=0.2, max_width=64))
    with serving(server=server):
        remote = client(server)
        remote.query(torch.randn(2, 6))
        deadline = time.monotonic() + 5
        while server.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.sessions and server.expired == 1
        with pytest.raises(DeviceFailure, match="lost layer 'layer'"):
            remote.query(torch.randn(2, 6))


# --------------------------------------------------------------------------- retries
class DroppingServer(DeviceServer):
    """Loses the reply to the first query it answers (as a network would)."""

    dropped = 0

    def _send(self, frames: list) -> None:
        if not self.dropped and any(b'"op"' not in bytes(f) and b'"name":"y"' in bytes(f) for f in frames[1:2]):
            self.dropped += 1
            return
        super()._send(frames)


def test_a_retried_query_whose_reply_was_lost_runs_once():
    opener, _ = device_opener(server_config(*NOISY).device, max_width=64)
    server = DroppingServer(opener, TOKEN, address="tcp://127.0.0.1:*")
    with serving(server=server):
        remote = RemoteDevice(6, 4, address=server.endpoint, seed=0, name="layer", timeout_s=0.5, open_timeout_s=OPEN_S)
        ref = reference(*NOISY)
        ledger = QueryLedger(remote, max_retries=2)
        x = torch.randn(3, 6)
        first = ledger.query(x, "forward")
        assert server.dropped == 1 and ledger.retries == 1
        torch.testing.assert_close(first, ref.query(x), rtol=0, atol=0)  # the reply of the one execution
        torch.testing.assert_close(ledger.query(x, "forward"), ref.query(x), rtol=0, atol=0)  # advanced once
        assert torch.equal(remote.generator_states()["noise"], ref.noise_gen.get_state())


class FailingSecondPartServer(DeviceServer):
    """Answers the first part of a split call, then loses the connection's reply to the second part
    and refuses to answer for a while (a network hiccup in the middle of a ZO chunk)."""

    answered = 0
    lost = 0

    def _send(self, frames: list) -> None:
        if any(b'"op"' not in bytes(f) and b'"name":"y"' in bytes(f) for f in frames[1:2]):
            self.answered += 1
            if self.answered == 2 and not self.lost:
                self.lost += 1
                return
        super()._send(frames)


def test_a_split_call_retried_after_a_lost_part_asks_only_for_what_is_missing():
    """K settings over a small message limit go in several requests; when one of them is lost, the
    ledger's retry sends the call again: the parts already answered are not measured twice (the
    noise stream advances exactly as in-process) and the readings are the in-process ones."""
    opener, _ = device_opener(server_config(*NOISY).device, max_width=64)
    server = FailingSecondPartServer(opener, TOKEN, address="tcp://127.0.0.1:*")
    with serving(server=server):
        remote = RemoteDevice(6, 4, address=server.endpoint, seed=0, name="layer", timeout_s=0.5, open_timeout_s=OPEN_S)
        ref = reference(*NOISY)
        remote.connection.max_message_bytes = 64 * 1024 + 3 * 4 * ref.theta.numel() + 200  # a few settings per call
        ledger = QueryLedger(remote, max_retries=2)
        x = torch.randn(3, 6)
        thetas = ref.theta.detach() + 0.1 * torch.randn(9, *ref.theta.shape, generator=torch.Generator().manual_seed(0))
        got = ledger.query_settings(x, thetas, "zo")
        assert server.lost == 1 and ledger.retries == 1 and server.answered >= 4
        k, _ = remote._split(9, 3, shared_rows=True)  # the settings per request, as in-process calls
        expected = torch.cat([ref.query(x, thetas[i : i + k], purpose="zo") for i in range(0, 9, k)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert torch.equal(remote.generator_states()["noise"], ref.noise_gen.get_state())


def test_a_request_id_reused_for_other_content_is_refused():
    with serving("device=slm") as server:
        assert raw_request(server.endpoint, encode(request_header("open", d_in=6, d_out=4, seed=0, name="a")))["ok"]
        again = raw_request(server.endpoint, encode(request_header("open", d_in=6, d_out=4, seed=0, name="b")))
        assert again["error"]["code"] == "malformed" and "already used" in again["error"]["message"]


# --------------------------------------------------------------------------- state and malformed input
class CountingChip(LabDevice):
    """A 2 → 2 chip with a counter as its state; its load_state changes the counter, then refuses."""

    def __init__(self):
        self.counter = torch.zeros(1, dtype=torch.int64)

    def info(self) -> DeviceInfo:
        return DeviceInfo("counting chip", 2, 2, (2, 2), phase_range=None)

    def program(self, theta: Tensor) -> None:
        self.theta = theta

    def measure(self, x: Tensor, purpose: str = "forward") -> Tensor:
        self.counter += 1
        return x @ self.theta.T

    def state(self) -> dict[str, Tensor]:
        return {"counter": self.counter.clone()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.counter = state["counter"].clone()
        if int(self.counter) < 0:
            raise ValueError("a counter is never negative")


def test_set_state_changes_nothing_when_refused():
    with serving(*NOISY) as server:
        remote = client(server)
        ref = reference(*NOISY)
        x = torch.randn(2, 6)
        torch.testing.assert_close(remote.query(x), ref.query(x), rtol=0, atol=0)
        good = remote.generator_states()
        broken = [
            {**good, "faults": torch.zeros_like(good["faults"])},  # not a generator state (checked last)
            {**good, "drift_offset": torch.full_like(good["drift_offset"], float("nan"))},
            {**good, "noise": good["noise"][:-1]},
            {k: v for k, v in good.items() if k != "drift"},
        ]
        for state in broken:
            with pytest.raises(DeviceFault, match=r"\(malformed\): set_state"):
                remote.connection.request("set_state", {"handle": remote.handle}, state)
        torch.testing.assert_close(remote.query(x), ref.query(x), rtol=0, atol=0)  # the noise stream is untouched

    chip = CountingChip()
    server = DeviceServer(lambda *args: chip, TOKEN, address="tcp://127.0.0.1:*")
    with serving(server=server):
        remote = RemoteDevice(2, 2, address=server.endpoint, open_timeout_s=OPEN_S, timeout_s=5)
        remote.query(torch.ones(1, 2), torch.eye(2))
        with pytest.raises(DeviceFault, match="never negative"):
            remote.connection.request("set_state", {"handle": remote.handle}, {"counter": torch.tensor([-5])})
        assert int(remote.generator_states()["counter"]) == 1  # put back


def test_malformed_input_of_any_kind_is_malformed_never_internal():
    with serving("device=slm") as server:
        ep = server.endpoint
        opened = raw_request(ep, encode(request_header("open", d_in=6, d_out=4, seed=0, name="layer")))
        handle, theta = opened["handle"], torch.zeros(opened["info"]["theta_shape"])
        query = request_header("query", handle=handle)
        x = torch.randn(2, 6)
        nan_x = torch.full((2, 6), float("nan"))
        bad = [
            [b"[" * 30000 + b"]" * 30000],  # deep JSON
            [b'{"v":2,"op":"ping","id":' + b"9" * 5000 + b"}"],  # a 5000-digit integer
            [
                json.dumps(request_header("open", d_in=6, d_out=4, seed=0, name="\ud800", id=2)).encode()
            ],  # lone surrogate
            [json.dumps({**query, "id": 3}).replace('"id": 3', '"id": 3, "x": NaN').encode()],  # NaN
            [b'{"v":2,"op":"ping","id":1e999}'],  # an infinite number
            encode(request_header("open", d_in="6", d_out=4, seed=0, name="l", id=4)),  # wrong types
            encode(request_header("open", d_in=6, d_out=4, seed=2**70, name="l", id=5)),
            encode(request_header("open", d_in=6, d_out=4, seed=0, name=["l"], id=6)),
            encode({**query, "id": 7, "purpose": 3}, {"x": x, "theta": theta}),
            encode({**query, "id": 8, "handle": ["x"]}, {"x": x, "theta": theta}),
            encode({**query, "id": 9}, {"x": nan_x, "theta": theta}),  # NaN rows
            encode({**query, "id": 10}, {"x": x, "theta": torch.full_like(theta, float("inf"))}),  # an infinite setting
            encode({**query, "id": 1.5}, {"x": x}),  # a float id
            encode({**query, "id": 11, "session": "not hex"}, {"x": x}),
            encode({**query, "id": 12, "session": None}, {"x": x}),
            [
                json.dumps(
                    {**query, "id": 13, "tensors": [{"name": "x", "dtype": ["float32"], "shape": [1]}]}
                ).encode(),
                b"1234",
            ],
            [
                json.dumps(
                    {**query, "id": 14, "tensors": [{"name": "x", "dtype": "float32", "shape": [2**70]}]}
                ).encode(),
                b"12",
            ],
        ]
        codes = [raw_request(ep, frames)["error"]["code"] for frames in bad]
        assert codes == ["malformed"] * len(bad)
        assert raw_request(ep, encode({**query, "id": 20}, {"x": x, "theta": theta}))["ok"]


def test_bad_message_logging_is_rate_limited(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("astraora.test"), 3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="astraora.test"):
        for i in range(10):
            limited.warning("bad message %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad message 0", "bad message 1", "bad message 2"]
        now[0] = 61.0
        limited.tick()
        assert caplog.records[-1].getMessage() == "suppressed 7 more lines about refused requests in the last 61 s"
        limited.warning("bad message again")
        assert caplog.records[-1].getMessage() == "bad message again"

    server = simulator_server("device=slm", log_per_minute=5)
    with serving(server=server), caplog.at_level(logging.WARNING, logger="astraora.server"):
        caplog.clear()
        sock = peer(server.endpoint)
        for _ in range(40):
            sock.send_multipart([b"not json"])
        for _ in range(40):
            assert sock.poll(5000)
            sock.recv_multipart()
        sock.close()
        assert server.refused == 40 and len(caplog.records) == 5


# --------------------------------------------------------------------------- liveness
@pytest.mark.slow
def test_a_dead_server_is_noticed_in_seconds():
    server = simulator_server("device=slm")
    stop = threading.Event()
    server.bind()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    remote = RemoteDevice(6, 4, address=server.endpoint, timeout_s=30, open_timeout_s=OPEN_S, connect_timeout_s=0.5)
    ledger = QueryLedger(remote, max_retries=3)
    x = torch.randn(2, 6)
    ledger.query(x, "forward")
    stop.set()
    thread.join()
    server.close()  # the connection closes, as when the process is killed
    start = time.monotonic()
    with pytest.raises(DeviceFailure, match="failed 4 times"):
        ledger.query(x, "forward")
    assert time.monotonic() - start < 4  # not timeout_s (30 s) per attempt
    assert remote.generator_states() == {}  # a device without state: nothing to ask a dead server for
    noisy = RemoteDevice.__new__(RemoteDevice)  # a stateful device whose server is gone
    vars(noisy).update(vars(remote), stateful=True, control_retries=1)
    start = time.monotonic()
    with pytest.raises(DeviceFailure, match="get_state call failed 2 times"):
        noisy.generator_states()  # a checkpoint now would hold a state the device no longer has
    assert time.monotonic() - start < 4


class SlowOpenChip(LabDevice):
    """A 2 → 2 chip whose opening takes a while (a large simulator being built)."""

    def info(self) -> DeviceInfo:
        return DeviceInfo("slow chip", 2, 2, (2, 2), phase_range=None)

    def program(self, theta: Tensor) -> None:
        self.theta = theta

    def measure(self, x: Tensor, purpose: str = "forward") -> Tensor:
        return x @ self.theta.T


@pytest.mark.slow
def test_the_socket_loop_answers_while_a_big_open_runs():
    fast = SlowOpenChip()

    def opener(d_in: int, d_out: int, seed: int, name: str) -> LabDevice:
        if name == "big":
            time.sleep(2.0)
            return SlowOpenChip()
        return fast

    server = DeviceServer(opener, TOKEN, address="tcp://127.0.0.1:*")
    with serving(server=server):
        served = RemoteDevice(2, 2, address=server.endpoint, open_timeout_s=OPEN_S, timeout_s=5, name="small")
        big = threading.Thread(
            target=lambda: RemoteDevice(
                2, 2, address=server.endpoint, session="ef" * 16, name="big", open_timeout_s=10
            ),
            daemon=True,
        )
        big.start()
        time.sleep(0.2)
        start = time.monotonic()
        assert raw_request(server.endpoint, encode(request_header("ping")))["identity"] == "device"
        torch.testing.assert_close(served.query(torch.ones(1, 2), torch.eye(2)), torch.ones(1, 2))
        assert time.monotonic() - start < 0.5 and big.is_alive()  # answered while the open still runs
        big.join(timeout=10)
