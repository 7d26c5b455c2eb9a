"""Attacks on a device server, measured: what an unauthenticated peer can make the server hold,
how a good client's query rate holds up under floods, a second token holder and a huge open, and
how fast a killed server is noticed.

    python scripts/remote_attacks.py [--seconds 3]

Starts ``astraora-device-server device=slm`` as a subprocess on a loopback port (a random token),
serves a good client (a 64×64 layer, 16 rows per query) from this process, and prints one table.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

from astraora.errors import AstraoraError, DeviceFailure
from astraora.ledger import QueryLedger
from astraora.remote.client import RemoteDevice
from astraora.remote.keys import ClientKeys
from astraora.remote.token import TOKEN_ENV

REPO = Path(__file__).resolve().parents[1]
FRAME = 60 * 2**20  # what the review's peer sent: 3 frames of 60 MiB with MORE, on 2 connections


def start_server(token: str, *overrides: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), TOKEN_ENV: token}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "astraora.remote",
            "device=slm",
            "server.address=tcp://127.0.0.1:*",
            "server.max_width=8192",
            *overrides,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "serving" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain the log
            return proc, line.split(" on ")[1].split()[0].rstrip(",;")
    raise SystemExit("the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """The server's peak RSS while an attack runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def query_rate(remote: RemoteDevice, seconds: float) -> float:
    x = torch.randn(16, remote.d_in)
    calls, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            remote.query(x)
            calls += 1
        except AstraoraError:
            pass
    return calls / (time.monotonic() - start)


def more_frames(endpoint: str, keys: ClientKeys | None, stop: threading.Event) -> None:
    """One connection sending 3 × 60 MiB frames with MORE, never finishing the message."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = keys.secret, keys.public, keys.server
    sock.connect(endpoint)
    blob = b"\0" * FRAME
    for _ in range(3):
        sock.send(blob, zmq.SNDMORE)
    stop.wait()
    sock.close(0)


def raw_curve_frame(endpoint: str, stop: threading.Event) -> None:
    """A hand-written ZMTP peer: a greeting announcing CURVE, then a 60 MiB frame instead of HELLO."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0" * 32)
            raw.sendall(b"\x02" + struct.pack(">Q", FRAME))
            chunk = b"\0" * 2**20
            for _ in range(60):
                raw.sendall(chunk)
            stop.wait()
    except OSError:
        pass  # dropped by the server


def handshake_churn(endpoint: str, stop: threading.Event) -> None:
    """Connect, try a wrong key, disconnect, again and again."""
    wrong = ClientKeys.from_token("not-the-token-" + secrets.token_hex(4))
    while not stop.is_set():
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = wrong.secret, wrong.public, wrong.server
        sock.connect(endpoint)
        sock.send(b"\0" * 2**20)
        time.sleep(0.01)
        sock.close(0)


def many_layers(endpoint: str, token: str, results: dict) -> None:
    """A second token holder opening 70 small layers."""
    opened, refused, layers = 0, 0, []
    for i in range(70):
        try:
            layers.append(
                RemoteDevice(4, 4, address=endpoint, secret=token, name=f"l{i}", session="cd" * 16, open_timeout_s=10)
            )
            opened += 1
        except AstraoraError:
            refused += 1
    results.update(opened=opened, refused=refused)


def huge_open(endpoint: str, token: str, results: dict) -> None:
    start = time.monotonic()
    try:
        RemoteDevice(4000, 4000, address=endpoint, secret=token, name="huge", session="ef" * 16, open_timeout_s=120)
        results["open_s"] = time.monotonic() - start
    except AstraoraError as err:
        results["error"] = str(err)


def ping_latency(endpoint: str, token: str) -> float:
    from astraora.remote.client import Connection

    conn = Connection(endpoint, ClientKeys.from_token(token), 10, 2**20, session="aa" * 16)
    conn.request("ping")
    start = time.monotonic()
    conn.request("ping")
    conn.close()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    token = secrets.token_hex(16)
    server, endpoint = start_server(token)
    rows: list[tuple[str, str, str]] = []
    try:
        good = RemoteDevice(64, 64, address=endpoint, secret=token, name="good", timeout_s=30)
        query_rate(good, 0.5)
        base_rss = rss_mb(server.pid)
        rows.append(("baseline", f"{query_rate(good, args.seconds):.0f}", f"RSS {base_rss:.0f} MB"))

        for label, target, arg in (
            ("plain ZMQ, 3x60 MiB MORE frames x2 connections", more_frames, None),
            (
                "CURVE wrong key, 3x60 MiB MORE frames x2 connections",
                more_frames,
                ClientKeys.from_token("wrong-" + token),
            ),
        ):
            stop = threading.Event()
            sampler = Sampler(server.pid)
            threads = [threading.Thread(target=target, args=(endpoint, arg, stop), daemon=True) for _ in range(2)]
            for t in threads:
                t.start()
            rate = query_rate(good, args.seconds)
            held = rss_mb(server.pid) - base_rss
            peak = sampler.stop() - base_rss
            stop.set()
            rows.append((label, f"{rate:.0f}", f"held {held:+.1f} MB, peak {peak:+.1f} MB"))

        stop = threading.Event()
        sampler = Sampler(server.pid)
        threads = [threading.Thread(target=raw_curve_frame, args=(endpoint, stop), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        rate = query_rate(good, args.seconds)
        time.sleep(max(0.0, 6.0 - args.seconds))  # past server.handshake_s (5 s)
        held = rss_mb(server.pid) - base_rss
        peak = sampler.stop() - base_rss
        stop.set()
        rows.append(
            (
                "raw ZMTP: CURVE greeting then a 60 MiB frame x2",
                f"{rate:.0f}",
                f"held {held:+.1f} MB after 6 s, peak {peak:+.1f} MB",
            )
        )

        stop = threading.Event()
        threads = [threading.Thread(target=handshake_churn, args=(endpoint, stop), daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        rate = query_rate(good, args.seconds)
        stop.set()
        rows.append(("wrong-key connection churn x4 threads", f"{rate:.0f}", ""))

        results: dict = {}
        thread = threading.Thread(target=many_layers, args=(endpoint, token, results), daemon=True)
        thread.start()
        rate = query_rate(good, args.seconds)
        thread.join()
        good.query(torch.randn(16, 64))
        rows.append(
            (
                "second token holder opens 70 layers",
                f"{rate:.0f}",
                f"{results['opened']} opened, {results['refused']} refused; good layer kept",
            )
        )

        results = {}
        thread = threading.Thread(target=huge_open, args=(endpoint, token, results), daemon=True)
        thread.start()
        time.sleep(0.3)
        ping = ping_latency(endpoint, token)
        rate = query_rate(good, args.seconds)
        thread.join()
        rows.append(
            (
                "4000-wide open by another session",
                f"{rate:.0f}",
                f"ping {ping * 1000:.0f} ms during it; "
                + (f"open took {results['open_s']:.1f} s" if "open_s" in results else results["error"]),
            )
        )

        ledger = QueryLedger(good, max_retries=3)
        ledger.query(torch.randn(16, 64), "forward")
        server.send_signal(signal.SIGKILL)
        start = time.monotonic()
        try:
            ledger.query(torch.randn(16, 64), "forward")
            detect = "not detected"
        except DeviceFailure as err:
            detect = f"{time.monotonic() - start:.1f} s to DeviceFailure (3 retries, connect_timeout_s=3): {err}"
        rows.append(("SIGKILL of the server", "", detect))
    finally:
        server.kill()
        server.wait()

    width = max(len(r[0]) for r in rows)
    print(f"{'attack':<{width}}  {'good client queries/s':>21}  server")
    for label, rate, note in rows:
        print(f"{label:<{width}}  {rate:>21}  {note}")


if __name__ == "__main__":
    main()
