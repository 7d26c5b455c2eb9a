"""Read an offline W&B run back from its ``run-<id>.wandb`` file (no network, no W&B service).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records, each a 7-byte header (CRC, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)
and a chunk of one serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too small for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + HEADER + length > len(data):
            return  # a record still being written
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_offline_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """``{"config", "summary", "history", "run"}`` of the offline run in ``run_dir``
    (``.../wandb/offline-run-*``): the last value of each summary and config key, the history rows.
    W&B's service process may still be writing the file after ``wandb.finish()`` returns: this
    waits up to ``wait_s`` seconds for the run's exit record."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = {"config": {}, "summary": {}, "history": [], "run": None}
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "run":
            out["run"] = record.run
    return out
