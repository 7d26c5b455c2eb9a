"""A device served over the network: the same training as in-process, faults through the ledger,
a killed server then resume, and a server that refuses bad clients while serving the good one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq
from conftest import REPO, compose_config
from hydra import compose, initialize_config_dir
from torch import Tensor

from astraora.build import device_spec, make_device
from astraora.errors import ConfigError, DeviceFailure, DeviceFault
from astraora.ledger import QueryLedger
from astraora.paths import CONFIG_DIR
from astraora.remote import DeviceInfo, DeviceServer, LabDevice, RemoteDevice
from astraora.remote.benchmark import measure
from astraora.remote.keys import ClientKeys
from astraora.remote.server import build_server, check_device_override, device_opener
from astraora.remote.token import TOKEN_ENV, read_token
from astraora.remote.wire import PROTOCOL_VERSION, encode
from astraora.train import run

TOKEN = "test-token-0123456789"
FAST = ["debug=fast", "task.model.hidden=16", "surrogate.rank=4", "trainer.max_epochs=2"]


@pytest.fixture(autouse=True)
def token_env(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


def server_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("server", overrides=["server.address=tcp://127.0.0.1:*", *overrides])


@contextlib.contextmanager
def serving(*overrides: str, server: DeviceServer | None = None):
    """A server from conf/server.yaml (or the one given) answering in a thread; yields it, bound."""
    server = server or build_server(server_config(*overrides))
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()


# The handshake budget of the tests' clients: generous, so that a handshake slowed by a loaded machine (the
# in-thread server shares the GIL and the cores with the test) is not taken for a missing server; the tests
# that time a refusal or a missing server bound their own times.
OPEN_S = 30


def client(server: DeviceServer, d_in: int = 6, d_out: int = 4, **kwargs) -> RemoteDevice:
    options = {"address": server.endpoint, "seed": 0, "name": "layer", "timeout_s": 5, "open_timeout_s": OPEN_S}
    options |= kwargs
    return RemoteDevice(d_in, d_out, **options)


def peer(endpoint: str, token: str | None = TOKEN) -> zmq.Socket:
    """A DEALER socket connected to ``endpoint``: with the CURVE keys of ``token``, or none (None)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if token is not None:
        keys = ClientKeys.from_token(token)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = keys.secret, keys.public, keys.server
    sock.connect(endpoint)
    return sock


def raw_request(endpoint: str, frames: list, timeout_s: float = 5.0, token: str | None = TOKEN) -> dict | None:
    """Send frames on a fresh DEALER socket; the decoded reply header, or None without a reply."""
    sock = peer(endpoint, token)
    try:
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return json.loads(sock.recv_multipart()[0])
    finally:
        sock.close()


def request_header(op: str, **fields) -> dict:
    """A request header of the current protocol in a session of its own."""
    return {"v": PROTOCOL_VERSION, "op": op, "id": 1, "session": "ab" * 16, **fields}


# --------------------------------------------------------------------------- training
def test_training_over_loopback_equals_in_process(tmp_path):
    overrides = [*FAST, "device.nonideal.output_noise=0.02", "device.nonideal.drift_std=1e-3"]
    local = run(compose_config([*overrides, "device=mzi"], tmp_path / "local"))
    with serving("device=mzi", "device.nonideal.output_noise=0.02", "device.nonideal.drift_std=1e-3") as server:
        remote = run(
            compose_config(
                [*FAST, "device=remote", f"device.address={server.endpoint}", "device.timeout_s=10"],
                tmp_path / "remote",
            )
        )
    assert remote["status"] == "completed" and remote["device"] == "remote"
    for key in ("metrics", "queries", "reprograms", "steps", "epochs"):
        assert remote[key] == local[key], key
    assert remote["surrogate"]["rel_error"] is None  # no simulator on the training side: no oracle diagnostics
    header = (tmp_path / "remote" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "device/wait_seconds" in header and "surrogate/rel_error" not in header


@pytest.mark.slow
def test_a_served_entrywise_device_declares_its_structure_for_colored_differences(tmp_path):
    """The server's SLM or MRR bank declares its Jacobian's column offsets in `info`; zo=colored
    then trains over the wire exactly as in-process. A served mesh declares none and is refused."""
    crosstalk = ["device.nonideal.crosstalk=0.05"]
    local = run(compose_config([*FAST, "device=mrr", *crosstalk, "zo=colored"], tmp_path / "local"))
    with serving("device=mrr", *crosstalk) as server:
        assert client(server).jacobian_offsets() == (-1, 0, 1)
        # device=remote knows no family: the MRR bank's training settings (θ's rate) are chosen by
        # naming its family's entry in conf/physical
        remote = run(
            compose_config(
                [
                    *FAST,
                    "device=remote",
                    f"device.address={server.endpoint}",
                    "device.timeout_s=10",
                    "zo=colored",
                    "physical=mrr",
                ],
                tmp_path / "remote",
            )
        )
    for key in ("metrics", "queries", "reprograms", "steps"):
        assert remote[key] == local[key], key
    with serving("device=mzi") as server:
        assert client(server).jacobian_offsets() is None
        with pytest.raises(ConfigError, match="zo.direction=colored needs a device with one control per matrix entry"):
            run(
                compose_config(
                    [*FAST, "device=remote", f"device.address={server.endpoint}", "zo=colored"], tmp_path / "mzi"
                )
            )


def test_a_served_chips_family_training_settings_are_chosen_by_naming_the_family():
    """device=remote knows no family: θ's rate, θ's schedule and the estimator are the framework's
    unless the family's training settings are named (physical=slm, conf/physical/slm.yaml)."""
    plain = compose_config(["device=remote"])
    assert (plain.physical_optimizer.lr, plain.zo.direction) == (1e-2, "gaussian")
    assert plain.physical_scheduler.name == plain.scheduler.name
    slm = compose_config(["device=remote", "physical=slm", "zo=colored"])
    assert (slm.physical_optimizer.lr, slm.zo.direction, slm.physical_scheduler.name) == (3e-3, "colored", "constant")
    assert not {"theta_lr", "zo_direction", "theta_schedule"} & set(device_spec(slm.device))


def test_remote_device_refuses_oracle_modes(tmp_path):
    with serving("device=slm") as server:
        cfg = compose_config([*FAST, "device=remote", f"device.address={server.endpoint}", "mode=exact+sm"], tmp_path)
        with pytest.raises(ConfigError, match="no simulator; use mode=zo"):
            run(cfg)


def start_server_process(address: str, *overrides: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), TOKEN_ENV: TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "astraora.remote", "device=slm", f"server.address={address}", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # "astraora-device-server: serving ... on tcp://127.0.0.1:PORT[, adding ...]"
        if "serving" in line:
            return proc, line.split(" on ")[1].split()[0].rstrip(",;")
        seen.append(line)
    raise AssertionError("the server did not start: " + "".join(seen))


@pytest.mark.slow
def test_killed_server_checkpoints_and_stops_then_resume_finishes(tmp_path):
    server, endpoint = start_server_process("tcp://127.0.0.1:*", "server.delay_s=0.05")  # a slow chip
    run_dir = tmp_path / "run"
    args = [
        *FAST,
        "trainer.max_epochs=3",
        "device=remote",
        f"device.address={endpoint}",
        "device.timeout_s=0.5",
        "device.driver.max_retries=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", TOKEN_ENV: TOKEN}
    train = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "step2.ckpt").exists() and time.time() < deadline and train.poll() is None:
            time.sleep(0.02)
        server.kill()  # mid-run: the next query times out, is retried, times out again
        server.wait()
        stdout, stderr = train.communicate(timeout=120)
    finally:
        for proc in (server, train):
            proc.kill()
            proc.wait()
    assert train.returncode == 3, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: device 'head.physical': a ") and "failed 2 times" in lines[-1]
    assert f"device server {endpoint}" in lines[-1] and (
        "closed the connection" in lines[-1] or "no connection" in lines[-1]
    )
    assert TOKEN not in stdout + stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "device_failure" and 2 <= summary["steps"] < 9
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    server, _ = start_server_process(endpoint)  # restarted on the same address, without the delay
    try:
        resumed = run(compose_config([*args, f"resume={run_dir}"], tmp_path / "elsewhere"))
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    assert resumed["status"] == "completed" and resumed["steps"] == 9 and resumed["run_dir"] == str(run_dir)


def test_unreachable_server_stops_the_build():
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        DeviceFailure,
        match=f"tcp://127.0.0.1:{port}: no connection within 0.2 s "
        r"\(is astraora-device-server running there\?\)$",
    ):
        RemoteDevice(4, 4, address=f"tcp://127.0.0.1:{port}", open_timeout_s=0.2)


# --------------------------------------------------------------------------- security
@pytest.mark.slow
def test_bad_clients_are_refused_and_the_good_one_is_served_unchanged():
    noisy = ["device=slm", "device.nonideal.output_noise=0.1", "server.max_message_mb=1"]
    reference = make_device(server_config(*noisy).device, 6, 4, 0, "layer")
    x = torch.randn(3, 6)
    expected = [reference.query(x), reference.query(x)]  # the noise stream of two queries in a row
    with serving(*noisy) as server:
        good = client(server)
        torch.testing.assert_close(good.query(x), expected[0], rtol=0, atol=0)

        with pytest.raises(ConfigError, match="refused this client's key at the handshake"):
            client(server, secret="wrong-token-0000")
        ep, handle, session = server.endpoint, good.handle, good.connection.session
        query = {"v": PROTOCOL_VERSION, "op": "query", "id": 7, "session": session, "handle": handle}
        theta = good.theta.detach()
        # without the keys nothing gets through: no reply, and the server never sees a request
        assert raw_request(ep, encode(query, {"x": x, "theta": theta}), timeout_s=0.5, token="wrong-token-0000") is None
        assert raw_request(ep, encode(query, {"x": x, "theta": theta}), timeout_s=0.5, token=None) is None
        before = server.requests
        ids = iter(range(100, 200))  # a repeated id would be answered from the session's cache
        query = {**query, "id": 0}
        replies = [
            raw_request(ep, [b"\x00\xff garbage \x13"]),  # not JSON
            raw_request(ep, [b"[1, 2]"]),  # JSON, not an object
            raw_request(
                ep,
                [
                    json.dumps(
                        {**query, "id": next(ids), "tensors": [{"name": "x", "dtype": "object", "shape": [1]}]}
                    ).encode(),
                    b"\x80",
                ],
            ),
            raw_request(
                ep,
                [
                    json.dumps(
                        {**query, "id": next(ids), "tensors": [{"name": "x", "dtype": "float32", "shape": [9, 9]}]}
                    ).encode(),
                    b"1234",
                ],
            ),
            raw_request(
                ep, encode({**query, "id": next(ids)}, {"x": torch.randn(3, 5), "theta": theta})
            ),  # wrong width
            raw_request(ep, encode({**query, "id": next(ids), "purpose": "steal"}, {"x": x, "theta": theta})),
            raw_request(ep, encode({**query, "id": next(ids), "op": "exec"})),  # unknown op
            raw_request(ep, encode({**query, "id": next(ids), "handle": "nope"}, {"x": x, "theta": theta})),
            raw_request(
                ep, encode({**query, "id": next(ids), "op": "set_state"}, {"noise": torch.zeros(3, dtype=torch.uint8)})
            ),
            raw_request(
                ep, encode({**query, "id": next(ids)}, {f"t{i}": torch.zeros(2**17) for i in range(3)})
            ),  # 1.5 MiB in frames of 0.5
            raw_request(
                ep, encode({**query, "id": next(ids), "v": 1, "token": TOKEN}, {"x": x, "theta": theta})
            ),  # the old protocol
        ]
        codes = [r["error"]["code"] if r and not r["ok"] else r for r in replies]
        assert codes == [
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "malformed",
            "unknown_handle",
            "malformed",
            "too_large",
            "malformed",
        ]
        assert raw_request(ep, [b"x" * (2 * 2**20)], timeout_s=0.5) is None  # one frame over the limit: dropped unread
        with socket.create_connection(("127.0.0.1", int(ep.rsplit(":", 1)[1]))) as raw:  # not even ZeroMQ
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))

        # the legitimate client is still served, and nothing above touched its device's noise stream
        torch.testing.assert_close(good.query(x), expected[1], rtol=0, atol=0)
        assert server.requests - before == len(replies) + 1 and server.refused >= len(replies)
        with pytest.raises(ConfigError, match="exceeds device.max_message_mb"):
            good.connection.request("query", {"handle": handle}, {"x": torch.zeros(2**19)})


def test_tokens_and_settings_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match=f"set the environment variable {TOKEN_ENV} or server.token_file"):
        read_token(None, "server.token_file")
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(str(tmp_path / "token"), "device.token_file") == TOKEN
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        read_token(str(tmp_path / "short"), "device.token_file")
    with pytest.raises(ConfigError, match="device.token_file=.*missing is not a readable"):
        read_token(str(tmp_path / "missing"), "device.token_file")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(ConfigError, match=r"server.delay_s=-1 is not allowed"):
        build_server(server_config("server.delay_s=-1"))
    with pytest.raises(ConfigError, match=r"server.address='udp://x' must be a tcp://"):
        build_server(server_config("server.address=udp://x"))
    with pytest.raises(SystemExit) as exit_info:
        check_device_override(["device=remote"])
    assert exit_info.value.code == 2 and "choose one of" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="device.address='localhost:5555' must be a tcp://"):
        RemoteDevice(4, 4, address="localhost:5555")
    with pytest.raises(ConfigError, match="device.timeout_s=0 is not allowed"):
        RemoteDevice(4, 4, timeout_s=0)


# --------------------------------------------------------------------------- protocol details
class ToyChip(LabDevice):
    """A fixed 5 → 3 "chip": A(θ) = θ itself (a 3×5 bank), at most 2 rows per call."""

    def __init__(self, d_in: int = 5, d_out: int = 3):
        self.shape = (d_out, d_in)
        self.programs = 0

    def info(self) -> DeviceInfo:
        return DeviceInfo("toy chip s/n 1", self.shape[1], self.shape[0], self.shape, max_rows=2, phase_range=None)

    def program(self, theta: Tensor) -> None:
        self.theta, self.programs = theta.clone(), self.programs + 1

    def measure(self, x: Tensor, purpose: str = "forward") -> Tensor:
        if x.abs().max() > 1e6:
            raise DeviceFault("detector saturated")
        return x @ self.theta.T


def test_lab_device_fixed_shape_row_limit_and_faults():
    opener, identity = device_opener({"family": "toy", "_target_": f"{__name__}.ToyChip"}, max_width=64)
    assert identity == "toy chip s/n 1"
    server = DeviceServer(opener, TOKEN, address="tcp://127.0.0.1:*", max_rows=None)
    with serving(server=server):
        with pytest.raises(ConfigError, match=r"fixed at d_in=5, d_out=3; layer 'layer' asked for d_in=6, d_out=4"):
            client(server)
        remote = client(server, 5, 3)
        assert remote.info["identity"] == "toy chip s/n 1" and not remote.is_phase_device
        assert torch.equal(remote.theta, torch.zeros(3, 5))
        theta = torch.randn(3, 5)
        x = torch.randn(7, 5)
        torch.testing.assert_close(remote.query(x, theta), x @ theta.T)  # 7 rows in calls of 2
        thetas = torch.randn(4, 3, 5)
        torch.testing.assert_close(remote.query(x, thetas), torch.einsum("bn,kmn->kbm", x, thetas))
        ledger = QueryLedger(remote, max_retries=1)
        with pytest.raises(DeviceFailure, match="detector saturated"):
            ledger.query(torch.full((1, 5), 1e7), "forward")
        assert ledger.retries == 1


def test_message_limit_splits_calls_and_delay_is_counted_as_wait():
    with serving("device=mrr", "server.delay_s=0.02") as server:
        remote = client(server, 8, 6)
        local = make_device(server_config("device=mrr").device, 8, 6, 0, "layer")
        x, thetas = torch.randn(5, 8), local.theta.detach() + 0.1 * torch.randn(7, *local.theta.shape)
        whole = remote.query(x, thetas)
        torch.testing.assert_close(whole, local.query(x, thetas), rtol=0, atol=0)
        remote.connection.max_message_bytes = 64 * 1024 + 3 * 4 * local.theta.numel() + 200  # a few settings per call
        torch.testing.assert_close(remote.query(x, thetas), whole)  # smaller batches round differently
        ledger = QueryLedger(remote)
        start = time.monotonic()
        for _ in range(3):
            ledger.query(x, "forward")
        assert 0.06 <= ledger.wait_seconds <= time.monotonic() - start
        assert ledger.counts()["device/wait_seconds"] == ledger.wait_seconds
        assert QueryLedger(local).counts().keys() == ledger.counts().keys() - {"device/wait_seconds"}


def test_a_lost_layer_with_state_stops_the_run_and_one_without_continues():
    """A server that lost a layer (restart, expired session) must not let a noisy device continue
    from a rewound noise stream: DeviceFailure, resume from the last checkpoint. A device without
    state (a noiseless simulator) is opened again and continues exactly."""
    noisy = ["device=slm", "device.nonideal.output_noise=0.1"]
    with serving(*noisy) as server:
        remote = client(server)
        reference = make_device(server_config(*noisy).device, 6, 4, 0, "layer")
        x = torch.randn(2, 6)
        torch.testing.assert_close(remote.query(x), reference.query(x), rtol=0, atol=0)
        state = remote.generator_states()  # as a checkpoint does
        assert remote.stateful and set(state) == {"noise", "drift", "faults", "drift_offset"}
        server.sessions.clear()  # what a restart loses
        with pytest.raises(
            DeviceFailure,
            match=r"lost layer 'layer' \(restarted\?\); resume=<run dir> continues "
            "exactly from the last checkpoint",
        ):
            QueryLedger(remote, max_retries=3).query(x, "forward")
        assert not server.sessions  # nothing was opened behind the run's back
        with pytest.raises(DeviceFailure):  # no checkpoint from a state the server no longer has
            remote.generator_states()
        resumed = client(server)  # what resume does: a new layer, the checkpoint's generator states
        resumed.load_generator_states(state)
        torch.testing.assert_close(resumed.query(x), reference.query(x), rtol=0, atol=0)

    with serving("device=slm", "device.nonideal.phase_bits=6") as server:  # deterministic: no state to lose
        remote = client(server)
        reference = make_device(server_config("device=slm", "device.nonideal.phase_bits=6").device, 6, 4, 0, "layer")
        assert not remote.stateful
        x = torch.randn(2, 6)
        torch.testing.assert_close(remote.query(x), reference.query(x), rtol=0, atol=0)
        server.sessions.clear()
        torch.testing.assert_close(remote.query(x), reference.query(x), rtol=0, atol=0)
        assert sum(len(s.layers) for s in server.sessions.values()) == 1


def test_benchmark_prints_loopback_and_in_process_rates():
    lines = measure("slm", width=8, batch=4, settings=3, seconds=0.05)
    assert len(lines) == 2 and all(
        "in-process" in line and "loopback" in line and "queries/s" in line for line in lines
    )
