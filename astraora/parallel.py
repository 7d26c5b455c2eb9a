"""Data-parallel coordination: what the processes of one run exchange, and how they stop together.

Every process holds the same θ and surrogate and measures its own shard of the batch (ALGORITHM.md §3;
:class:`RankSync` carries the physical layers' collectives). The DDP bookkeeping of the training
module lives here too: the digital buffers averaged after each step (:func:`average_buffers`), the
ledgers' counters summed over the processes (:func:`sum_over_ranks`, :func:`sum_counters`) and kept
per process in a checkpoint.

Faults: when one process stops, every process of the run stops, promptly and with one line.

* it raises (a DeviceFailure, or any other error): before it exits it leaves a note for rank 0
  (:meth:`RankSync.announce`, called by :class:`astraora.lit.faults.StopTogether`); rank 0, waiting
  in a collective of the physical layers, reads it and stops at once, naming it; the others'
  collectives fail when it exits;
* it is killed (SIGKILL, out of memory): its connections close, so every collective with it fails
  at once, and the processes left raise a PeerFailure instead of gloo's or NCCL's error
  (:func:`peer_failure` for the collectives outside the physical layers).

The processes stopped that way exit with code 3 after one line (the failing one as it would alone:
code 3 for a device failure); rank 0, if alive, writes summary.json (:func:`summary_status`:
``device_failure`` when a device failed, ``peer_failure`` when a process was lost or failed
otherwise). No checkpoint is written from the middle of a step: ``resume=`` continues from the last
periodic or epoch checkpoint.

Nothing here imports Lightning.
"""

from __future__ import annotations

import io
import json
import time

import torch
from torch import Tensor, nn

from astraora.errors import AstraoraError, DeviceFailure, PeerFailure

# the ledger's counters (QueryLedger.state_dict) summed over the processes in a checkpoint
LEDGER_COUNTERS = ("queries", "reprograms", "oracle", "retries", "skipped", "wait_seconds")


def world_size() -> int:
    """Processes in the data-parallel run (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a torch.distributed collective (gloo, NCCL) or store operation that
    failed: a peer's connection closed (it stopped) or the operation timed out."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text
        for mark in ("gloo", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL")
    )


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters (it may come from the network)."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RankSync:
    """The collectives a HybridLayer needs under data-parallel training (``torch.distributed``).

    Every process holds the same θ and surrogate; each measures its own shard of the batch. The
    ZO coefficients are averaged (:meth:`mean`, M floats per estimate; colored differences, which
    read whole matrices out, are measured on rank 0 only: see
    :meth:`astraora.hybrid.HybridLayer._colored_once`, 2·m·n floats); the surrogate is updated
    on rank 0 only and its factors broadcast (:meth:`broadcast`, (m + n)·r + r² + 1 floats), so
    its queries are made, and counted, once. ``floats`` counts the numbers each collective moved,
    by purpose, for the communication figure.

    Stopping together: a collective that fails because another process stopped (its connections
    closed: killed, crashed, or exited after an error) raises a :class:`PeerFailure` (or a
    DeviceFailure where that process's device failed) instead of gloo's or NCCL's error, and no
    collective runs after that. A process other than rank 0 that stops on an error of its own
    leaves a short JSON note in the process group's store (:meth:`announce`); rank 0, which hosts
    the store and writes summary.json, reads the notes while it waits in a collective, so it stops
    at once and names the cause. Nothing read from the store is unpickled (anyone who can reach
    its port can write there): notes are size-limited JSON, counters are integers. The other
    ranks never read the store, and write their note only after a plain socket found its server
    still there: if rank 0 is gone, so is the store, and a store call would print the C++
    client's error with its stack frames.
    """

    NOTE = "astraora/stop/"  # + rank: the note a process other than rank 0 leaves when it stops
    NOTES = "astraora/stops"  # counter: how many notes were left (one integer to poll)
    NOTE_BYTES = 4096  # notes longer than this are refused unparsed

    def __init__(self, store=None, rank: int | None = None, world_size: int | None = None):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.floats = {"zo": 0, "surrogate": 0, "health": 0, "control": 0}
        # The process group's key-value store: a channel besides the collectives, through which a
        # process that stops tells rank 0 why (rank 0 may be waiting in a collective it never joins).
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.stopped: DeviceFailure | None = None  # why this process stops: no collectives any more

    # ----------------------------------------------------------------- coordinated stop
    def announce(self, error: BaseException) -> None:
        """Tell rank 0 that this process stops because of ``error``, its own failure (not a lost
        peer's), so that rank 0 stops at once and names it. Rank 0 itself leaves no note: the
        others learn that it stopped from their collectives failing when it exits."""
        if self.stopped is None:
            self.stopped = PeerFailure(f"this process stopped: {_one_line(error)}")
        if self.rank == 0 or not self._store_reachable():
            return
        kind = "device_failure" if isinstance(error, DeviceFailure) else "error"
        message = _one_line(str(error) if isinstance(error, AstraoraError) else f"{type(error).__name__}: {error}")
        try:
            self.store.set(f"{self.NOTE}{self.rank}", json.dumps({"kind": kind, "message": message}))
            self.store.add(self.NOTES, 1)
        except Exception:  # noqa: BLE001 - rank 0 went away meanwhile: nobody is left to tell
            pass

    def _store_reachable(self) -> bool:
        """Whether the store's server (in rank 0) still accepts connections, checked with a plain
        socket so that a gone server prints nothing (a store call would print a C++ trace)."""
        import socket

        store = self.store
        while hasattr(store, "underlying_store"):
            store = store.underlying_store
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        if not host or not port:
            return True  # an in-process or file store (tests)
        try:
            socket.create_connection((host, int(port)), timeout=2.0).close()
        except OSError:
            return False
        return True

    def notes(self) -> dict[int, dict]:
        """The notes left by the processes that stopped on an error of their own, by rank: each
        ``{"kind": "device_failure" | "error", "message": one line}``. Read on rank 0 only."""
        if self.rank != 0 or not self.store.add(self.NOTES, 0):
            return {}
        found = {}
        for rank in range(1, self.world_size):
            key = f"{self.NOTE}{rank}"
            if self.store.check([key]):
                found[rank] = self.parse_note(self.store.get(key))
        return found

    @classmethod
    def parse_note(cls, raw: bytes) -> dict:
        """A note as read from the store, checked: size-limited JSON with a known kind and a
        message shown as one printable line; anything else is reported as unreadable, never run."""
        note = None
        if len(raw) <= cls.NOTE_BYTES:
            try:
                note = json.loads(bytes(raw).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                note = None
        if (
            not isinstance(note, dict)
            or note.get("kind") not in ("device_failure", "error")
            or not isinstance(note.get("message"), str)
        ):
            return {"kind": "error", "message": "its note in the process group's store was unreadable"}
        return {"kind": note["kind"], "message": _one_line(note["message"])}

    def stop_error(self) -> DeviceFailure:
        """Why this process stops now that a collective failed or another process left a note: a
        DeviceFailure naming the process whose device failed, else a :class:`PeerFailure`."""
        if self.stopped is not None:
            return self.stopped
        notes = self.notes() if self.rank == 0 else {}
        if notes:
            rank, note = min(notes.items())
            kind = DeviceFailure if note["kind"] == "device_failure" else PeerFailure
            error = kind(f"data-parallel process {rank} stopped ({note['message']}); this process stops too.")
        elif self.rank == 0:
            who = "process 1" if self.world_size == 2 else "another process"
            error = PeerFailure(f"data-parallel {who} stopped (killed or crashed); this process stops too.")
        else:
            who = "process 0" if self.world_size == 2 else "another process"
            error = PeerFailure(
                f"data-parallel {who} stopped (killed, crashed or failed: see its output); this process stops too."
            )
        self.stopped = error
        return error

    def _wait(self, work) -> None:
        """Wait for a collective. If it fails (a process stopped: its connections closed) or, on
        rank 0, another process left a note meanwhile (it will never join), stop this process with
        :meth:`stop_error` instead of gloo's error or a hang until the process-group timeout."""
        spins, next_check = 0, 0.0
        while not work.is_completed():
            now = time.monotonic()
            if self.rank == 0 and now >= next_check:
                if self.store.add(self.NOTES, 0):
                    raise self.stop_error()
                next_check = now + 0.01
            spins += 1
            time.sleep(0 if spins < 100 else 2e-4)
        try:
            work.wait()
        except RuntimeError as err:  # gloo, NCCL (DistBackendError is a RuntimeError)
            raise self.stop_error() from err

    def _start(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def check(self) -> None:
        """A one-float collective that every process passes together, or leaves with a
        DeviceFailure when another stopped (before a collective that cannot be watched)."""
        self._reduce(torch.zeros(1), "control")

    def gather_object(self, obj) -> list | None:
        """``obj`` of every process, by rank, on rank 0 (None elsewhere). Sent as ``torch.save``
        bytes and read back with ``torch.load(weights_only=True)``: tensors, numbers, strings and
        containers only, so nothing a peer sends can run code here (torch's all_gather_object
        unpickles)."""
        self._start()
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        device = self._collective_device()
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
        sizes = self._all_gather(torch.tensor([payload.numel()], dtype=torch.int64, device=device))
        padded = torch.zeros(int(max(int(n) for n in sizes)), dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        parts = self._all_gather(padded)
        if self.rank != 0:
            return None
        return [self.decode(part[: int(n)], rank) for rank, (part, n) in enumerate(zip(parts, sizes, strict=True))]

    @staticmethod
    def decode(data: Tensor, rank: int = 0):
        """What :meth:`gather_object` sent, from its bytes; refuses anything but plain data."""
        try:
            return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch's weights-only unpickler refuses other objects
            raise PeerFailure(
                f"data-parallel process {rank} sent a checkpoint state that is not plain tensors "
                f"and numbers ({_one_line(err, 200)}); this process stops."
            ) from None

    def _collective_device(self) -> torch.device:
        """Where the backend's collectives take tensors (NCCL: this process's GPU)."""
        if self._dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._wait(self._dist.all_gather(out, t, async_op=True))
        return out

    # ----------------------------------------------------------------- collectives
    def _reduce(self, t: Tensor, purpose: str) -> Tensor:
        self._start()
        self.floats[purpose] = self.floats.get(purpose, 0) + t.numel()
        t = t.contiguous()
        self._wait(self._dist.all_reduce(t, async_op=True))
        return t

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over the processes (the ZO estimator's reducer)."""
        return self._reduce(t.clone(), "zo") / self.world_size

    def sum(self, t: Tensor, purpose: str = "health") -> Tensor:
        return self._reduce(t.clone(), purpose)

    def broadcast(self, t: Tensor, purpose: str = "surrogate") -> Tensor:
        """``t`` as rank 0 holds it, on every process."""
        self._start()
        self.floats[purpose] = self.floats.get(purpose, 0) + t.numel()
        t = t.contiguous()
        self._wait(self._dist.broadcast(t, src=0, async_op=True))
        return t


# --------------------------------------------------------------------------- stopping together
def peer_failure(module, error: BaseException) -> DeviceFailure | None:
    """Under data-parallel training, the error to raise instead of ``error`` where ``error`` is a
    collective that failed because another process stopped (in DDP's gradient all-reduce, in one of
    Lightning's collectives): a :class:`PeerFailure`, or a DeviceFailure where that process's device
    failed. None otherwise: ``error`` is this process's own. ``module``: the training module (its
    ``_sync``, None when training alone)."""
    sync = getattr(module, "_sync", None)
    if sync is None or isinstance(error, AstraoraError) or not is_collective_failure(error):
        return None
    return sync.stop_error()


def summary_status(error: DeviceFailure) -> str:
    """summary.json's status for a run that stopped on ``error``: ``peer_failure`` where another
    data-parallel process was lost (or failed other than by its device), else ``device_failure``."""
    return "peer_failure" if isinstance(error, PeerFailure) else "device_failure"


def should_announce(sync: RankSync | None, error: BaseException) -> bool:
    """Whether ``error`` is this process's own failure, to be announced to rank 0: not a lost
    peer's, not an interruption, and nothing announced yet."""
    if sync is None or sync.stopped is not None or not isinstance(error, Exception):
        return False
    return not (isinstance(error, PeerFailure) or is_collective_failure(error))


# --------------------------------------------------------------------------- DDP bookkeeping
def exclude_from_ddp(module: nn.Module, params: list[Tensor]) -> None:
    """Keep ``params`` (θ: its ĝ is already the same on every process) and the surrogates' buffers
    (broadcast from rank 0) out of DDP's gradient all-reduce and buffer broadcast. Call before DDP
    wraps ``module``."""
    from torch.nn.parallel import DistributedDataParallel

    ids = {id(t) for t in params}
    ignore = [name for name, p in module.named_parameters() if id(p) in ids]
    ignore += [name for name, _ in module.named_buffers() if ".surrogate." in f".{name}"]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)


@torch.no_grad()
def average_buffers(buffers: list[Tensor], sync: RankSync | None) -> None:
    """Each process's ``buffers`` replaced by their mean over the processes (nothing alone).
    ``sync``: the physical layers' RankSync, whose collective leaves with a DeviceFailure if another
    process stopped (None: a plain all-reduce)."""
    world = world_size()
    if world == 1:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for b in buffers:
        groups.setdefault(b.dtype, []).append(b)
    for group in groups.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        if sync is not None:
            total = sync.sum(flat, "buffers")
        else:
            total = flat.clone()
            torch.distributed.all_reduce(total)
        for b, mean in zip(group, (total / world).split([b.numel() for b in group]), strict=True):
            b.copy_(mean.view_as(b))


def rank_divergence(sync: RankSync, tensors: list[Tensor]) -> float:
    """How far ``tensors`` differ between the processes: the largest entry-wise difference from
    rank 0's (0 where every process holds the same). Every process must call this together."""
    divergence = torch.stack([(t.detach() - sync.broadcast(t.detach().clone(), "check")).abs().max() for t in tensors])
    torch.distributed.all_reduce(divergence, op=torch.distributed.ReduceOp.MAX)
    return float(divergence.max())


def sum_over_ranks(sync: RankSync, totals: dict) -> dict:
    """``totals`` (counters by name) summed over the processes; integers stay integers. Every
    process must call this together, with the same names."""
    keys = sorted(totals)
    summed = sync.sum(torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64), "ledger").tolist()
    return {k: (int(round(v)) if isinstance(totals[k], int) else v) for k, v in zip(keys, summed, strict=True)}


def flatten_counters(state: dict) -> list[tuple[tuple, float]]:
    """A ledger state's counters as ((key,) or (key, purpose), value) pairs, in a fixed order."""
    out = []
    for key in LEDGER_COUNTERS:
        if isinstance(state.get(key), dict):
            out += [((key, sub), float(v)) for sub, v in sorted(state[key].items())]
        elif key in state:
            out.append(((key,), float(state[key])))
    return out


def unflatten_counters(state: dict, flat: list) -> None:
    """Write :func:`flatten_counters`' pairs back into a ledger state (integers but the wait)."""
    for path, value in flat:
        cast = float if path[0] == "wait_seconds" else int
        if len(path) == 2:
            state[path[0]][path[1]] = cast(round(value)) if cast is int else cast(value)
        else:
            state[path[0]] = cast(round(value)) if cast is int else cast(value)


def sum_counters(state: dict, states: list[dict]) -> None:
    """``state``'s ledger counters replaced by their sums over ``states`` (every process's)."""
    flat = flatten_counters(state)
    columns = [[v for _, v in flatten_counters(s)] for s in states]
    unflatten_counters(state, [(k, v) for (k, _), v in zip(flat, map(sum, zip(*columns, strict=True)), strict=True)])


def zero_counters(state: dict) -> None:
    """``state``'s ledger counters set to zero (a process that resumes from another's sums)."""
    unflatten_counters(state, [(k, 0) for k, _ in flatten_counters(state)])


def add_per_rank(checkpoint: dict, per_rank: list[dict], layer_keys: dict[str, str]) -> None:
    """Rank 0's checkpoint of a data-parallel run: every process's own state (``per_rank``, by rank:
    ``{"layers": {name: the layer's state}, "metrics": ..., "rng_states": ...}``) kept under
    ``per_rank``, and each physical layer's ledger counters summed over the processes (what a resume
    with another number of processes starts from). ``layer_keys``: each layer's state_dict key."""
    checkpoint["per_rank"] = per_rank
    for name, key in layer_keys.items():
        sum_counters(checkpoint["state_dict"][key]["ledger"], [r["layers"][name]["ledger"] for r in per_rank])


def take_per_rank(checkpoint: dict, rank: int, world: int, layer_keys: dict[str, str]) -> dict | None:
    """Process ``rank``'s part of a checkpoint, set into its ``state_dict``: with as many processes
    as wrote it, its own layer states and metric states (returned, to be set again after DDP's
    wrapper copied rank 0's buffers); with another number, rank 0 keeps the sums and the others'
    ledger counters start from zero (None returned)."""
    per_rank = checkpoint.get("per_rank")
    if per_rank is not None and len(per_rank) == world:
        mine = per_rank[rank]
        for name, key in layer_keys.items():
            checkpoint["state_dict"][key] = mine["layers"][name]
        checkpoint["state_dict"].update(mine["metrics"])
        return mine["metrics"]
    if rank != 0:
        for key in layer_keys.values():
            state = checkpoint["state_dict"].get(key, {}).get("ledger")
            if state is not None:
                zero_counters(state)
    return None
