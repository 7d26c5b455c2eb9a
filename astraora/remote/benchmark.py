"""Queries per second of a simulator over loopback (``device=remote``) against the same simulator
in-process, for the same shapes: what the network hop and the wire format cost.

``python scripts/benchmark_remote.py`` prints one line per call shape (a forward batch, a ZO chunk
of K settings). The server runs in a thread of this process, answering on a loopback TCP port.
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
from collections.abc import Callable

import torch

from astraora.build import make_device
from astraora.config import compose_entry
from astraora.paths import CONFIG_DIR
from astraora.remote.client import RemoteDevice
from astraora.remote.server import DeviceServer, device_opener


def rate(call: Callable[[], object], rows_per_call: int, seconds: float) -> float:
    """Rows (queries) per second of ``call``, repeated for about ``seconds`` after one warm-up call."""
    call()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls * rows_per_call / (time.perf_counter() - start)


def measure(
    device: str = "mzi",
    width: int = 64,
    batch: int = 64,
    settings: int = 100,
    seconds: float = 2.0,
    delay_s: float = 0.0,
) -> list[str]:
    """Benchmark lines for a ``width``×``width`` layer of ``conf/device/<device>.yaml``."""
    torch.set_num_threads(1)
    device_cfg = compose_entry("device", device, CONFIG_DIR)
    token = secrets.token_hex(16)
    opener, _ = device_opener(device_cfg, max_width=max(width, 1))
    server = DeviceServer(opener, token, address="tcp://127.0.0.1:*", delay_s=delay_s)
    endpoint = server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        local = make_device(device_cfg, width, width, 0, "benchmark")
        remote = RemoteDevice(width, width, address=endpoint, secret=token, seed=0, name="benchmark", timeout_s=60)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, width, generator=gen)
        theta = local.theta.detach()
        thetas = theta + 1e-4 * torch.randn(settings, *theta.shape, generator=gen)
        lines = []
        for label, args, rows in (
            (f"{batch} rows at one setting", (x, theta), batch),
            (f"{batch} rows at {settings} settings", (x, thetas), batch * settings),
        ):
            here = rate(lambda args=args: local.query(*args), rows, seconds)
            there = rate(lambda args=args: remote.query(*args), rows, seconds)
            lines.append(
                f"{device} {width}x{width}, {label}: in-process {here:,.0f} queries/s, "
                f"loopback {there:,.0f} queries/s ({there / here:.0%})"
            )
        remote.close()
        return lines
    finally:
        stop.set()
        thread.join()
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="mzi", help="a conf/device entry (a simulator)")
    parser.add_argument("--width", type=int, default=64, help="d_in = d_out of the layer")
    parser.add_argument("--batch", type=int, default=64, help="rows per call")
    parser.add_argument("--settings", type=int, default=100, help="K settings per ZO call")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--delay", type=float, default=0.0, help="server.delay_s: added latency per call")
    args = parser.parse_args(argv)
    for line in measure(args.device, args.width, args.batch, args.settings, args.seconds, args.delay):
        print(line)
