"""Data-parallel coordination (astraora.parallel, astraora.lit.faults): RankSync's collectives and
notes, stopping together, and the counters a data-parallel checkpoint sums. Whole data-parallel
runs: test_ddp.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from astraora import parallel
from astraora.errors import DeviceFailure, PeerFailure
from astraora.lit.faults import StopTogether
from astraora.parallel import RankSync, peer_failure, summary_status


class _Evil:
    """A pickle that runs code when unpickled (what anyone who reaches the store's port could write)."""

    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.ran = True
        return "ran"


class _Work:
    """A collective in flight: completed (or failed), or still waiting for 2 s."""

    def __init__(self, error: Exception | None = None, done: bool = True):
        self.error, self.done_at = error, time.monotonic() + (0 if done else 2)

    def is_completed(self) -> bool:
        return time.monotonic() >= self.done_at

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


class _NoStore:
    """The store of a process other than rank 0 after a failure: any call would be a bug (with rank 0
    gone, the C++ client prints a trace)."""

    def __getattr__(self, name):
        raise AssertionError(f"store.{name} called")


GLOO_LOST = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1")


def test_store_notes_are_plain_json_never_unpickled(monkeypatch):
    """Rank 0 reads why another process stopped from the process group's store, which anyone on the
    network can write to: a pickle there is refused unread (never run), as are an oversized note and
    one of the wrong shape; a note's message is shown as one printable line; a device failure keeps
    its kind (status device_failure), anything else is a PeerFailure (status peer_failure)."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on store data")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    evil = pickle.dumps(_Evil(), protocol=2)

    def rank0_with_note(value) -> RankSync:
        store = torch.distributed.HashStore()
        store.set(RankSync.NOTE + "1", value)
        store.add(RankSync.NOTES, 1)
        return RankSync(store, rank=0, world_size=2)

    for value in (
        evil,
        b"x" * (RankSync.NOTE_BYTES + 1),
        json.dumps(["error", "not a dict"]),
        json.dumps({"kind": "run_this", "message": "m"}),
        b"\xff\xfe",
    ):
        error = rank0_with_note(value).stop_error()
        assert type(error) is PeerFailure and "note in the process group's store was unreadable" in str(error)
    assert not _Evil.ran

    note = json.dumps({"kind": "device_failure", "message": "device 'head'\n\x1b[31mfailed\x00 " + "y" * 500})
    error = rank0_with_note(note).stop_error()
    assert type(error) is DeviceFailure and summary_status(error) == "device_failure"
    assert str(error).startswith("data-parallel process 1 stopped (device 'head' [31mfailed ")
    assert str(error).isprintable() and len(str(error)) < 400

    # what a process other than rank 0 writes is such a note
    store = torch.distributed.HashStore()
    RankSync(store, rank=1, world_size=2).announce(ValueError("a bug\nsecond line"))
    error = RankSync(store, rank=0, world_size=2).stop_error()
    assert type(error) is PeerFailure and summary_status(error) == "peer_failure"
    assert str(error) == "data-parallel process 1 stopped (ValueError: a bug second line); this process stops too."


def test_gathered_checkpoint_state_is_read_as_plain_data_only():
    """Every process's checkpoint state reaches rank 0 as torch.save bytes read back with
    weights_only=True: tensors and numbers come through, an object that would run code is refused."""
    import io
    import pickle

    state = {"ledger": {"queries": {"zo": 3}, "wait_seconds": 0.5}, "rng": [torch.arange(3), "MT19937", None]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    back = RankSync.decode(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    assert back["ledger"] == state["ledger"] and torch.equal(back["rng"][0], state["rng"][0])
    for raw in (pickle.dumps(_Evil(), protocol=2), _torch_saved(_Evil())):
        with pytest.raises(PeerFailure, match="process 1 sent a checkpoint state that is not plain"):
            RankSync.decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), rank=1)
    assert not _Evil.ran


def _torch_saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_failed_collective_becomes_one_astraora_error():
    """A collective that fails because the other process stopped raises a PeerFailure (exit 3, one
    line), not gloo's RuntimeError; after that no collective starts. A process other than rank 0
    does not touch the store on the way (rank 0, its server, may be gone)."""

    rank1 = RankSync(_NoStore(), rank=1, world_size=2)
    with pytest.raises(PeerFailure, match=r"^data-parallel process 0 stopped \(killed, crashed or failed") as caught:
        rank1._wait(_Work(GLOO_LOST))
    assert caught.value.__cause__ is GLOO_LOST
    with pytest.raises(PeerFailure):
        rank1.check()  # no collective after a stop

    rank0 = RankSync(torch.distributed.HashStore(), rank=0, world_size=2)
    with pytest.raises(PeerFailure, match=r"^data-parallel process 1 stopped \(killed or crashed\); this process"):
        rank0._wait(_Work(GLOO_LOST))

    # errors raised elsewhere (DDP's gradient all-reduce, Lightning's collectives): train.run asks
    class Module:
        _sync = RankSync(torch.distributed.HashStore(), rank=0, world_size=2)

    assert isinstance(peer_failure(Module(), GLOO_LOST), PeerFailure)
    assert peer_failure(Module(), RuntimeError("shape mismatch")) is None  # this process's own bug
    assert peer_failure(object(), GLOO_LOST) is None  # one process


def test_rank_0_stops_at_a_note_while_waiting():
    """Rank 0 waiting in a collective the other process will never join (it failed and left a
    note) stops at once with that process's DeviceFailure instead of hanging."""

    store = torch.distributed.HashStore()
    RankSync(store, rank=1, world_size=2).announce(DeviceFailure("device 'head.physical': a zo query failed 4 times"))
    started = time.monotonic()
    with pytest.raises(DeviceFailure, match=r"process 1 stopped \(device 'head.physical': a zo query failed"):
        RankSync(store, rank=0, world_size=2)._wait(_Work(done=False))
    assert time.monotonic() - started < 1


def test_launcher_kill_waits_for_rank_0_to_stop_by_itself():
    """Lightning's launcher kills every process within 5 s of one exiting with an error, which would
    kill rank 0 before it writes summary.json: StopTogether gives it a grace period first, then the
    launcher's kill still happens (the safety net)."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    child.wait()
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for rank 0
    try:
        observer = _ChildProcessObserver(main_pid=main.pid, child_processes=[child], sleep_period=3600)
        observer.start()  # sleeps; its check is called below
        assert StopTogether.defer_launcher_kill(grace_s=0.5)
        assert observer._run() is False and main.poll() is None  # rank 0 left to stop by itself
        time.sleep(0.6)
        assert observer._run() is True and main.wait(timeout=5) == -signal.SIGKILL
    finally:
        observer._finished = True
        if main.poll() is None:
            main.kill()


def _collectives_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One of ``world`` gloo processes: RankSync's mean, sum and broadcast of rank-dependent values."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sync = RankSync()
        t = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        results = {"input": t.clone(), "mean": sync.mean(t), "sum": sync.sum(t), "broadcast": sync.broadcast(t.clone())}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_sync_mean_is_the_mean_over_real_processes(tmp_path):
    """The ZO estimate's reducer averages over the processes: summing instead would double θ's step
    under SGD (Adam hides it, being blind to the gradient's scale), so the collectives are checked on
    two real gloo processes, not on a stand-in."""
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    inputs = [r["input"] for r in results]
    for r in results:
        assert torch.equal(r["mean"], (inputs[0] + inputs[1]) / 2)
        assert torch.equal(r["sum"], inputs[0] + inputs[1])
        assert torch.equal(r["broadcast"], inputs[0])


def test_only_a_process_own_failure_is_announced():
    """StopTogether tells rank 0 about this process's own error, not about a lost peer (a
    PeerFailure, a failed collective), an interruption, or a second time."""
    sync = RankSync(torch.distributed.HashStore(), rank=1, world_size=2)
    assert parallel.should_announce(sync, ValueError("a bug"))
    assert parallel.should_announce(sync, DeviceFailure("device 'head': failed"))
    for other in (PeerFailure("lost"), GLOO_LOST, KeyboardInterrupt()):
        assert not parallel.should_announce(sync, other)
    assert not parallel.should_announce(None, ValueError("alone"))
    sync.announce(ValueError("a bug"))
    assert not parallel.should_announce(sync, ValueError("again"))


def test_ledger_counters_are_summed_over_processes_and_zeroed():
    """A data-parallel checkpoint holds each ledger counter summed over the processes (integers but
    the wait), and a process that resumes from those sums in another process count starts at zero;
    the ledger's other state is left alone."""

    def ledger(zo: int, forward: int, wait: float) -> dict:
        return {
            "queries": {"forward": forward, "zo": zo},
            "reprograms": 2 * zo,
            "skipped": {"zo": 0},
            "wait_seconds": wait,
            "programmed": "θ",
        }

    states = [ledger(3, 10, 0.25), ledger(5, 12, 0.5)]
    flat = parallel.flatten_counters(states[0])
    assert flat[0] == (("queries", "forward"), 10.0) and (("wait_seconds",), 0.25) in flat
    total = ledger(0, 0, 0.0)
    parallel.sum_counters(total, states)
    assert total == ledger(8, 22, 0.75) and isinstance(total["queries"]["zo"], int)
    parallel.zero_counters(total)
    assert total == ledger(0, 0, 0.0) and total["programmed"] == "θ"


def test_checkpoint_keeps_every_process_state_and_hands_it_back():
    """Rank 0's checkpoint holds each process's own layer and metric states and the ledgers' sums;
    a resume with as many processes gives each its own, one with another number gives rank 0 the
    sums and the others zero counters."""

    def ledger(zo: int) -> dict:
        return {"queries": {"zo": zo}, "reprograms": zo, "wait_seconds": 0.0}

    keys = {"head": "model.head._extra_state"}
    per_rank = [{"layers": {"head": {"ledger": ledger(3 + r)}}, "metrics": {"acc.tp": torch.tensor(r)}} for r in (0, 1)]

    def written() -> dict:
        checkpoint = {"state_dict": {keys["head"]: {"ledger": ledger(3)}, "acc.tp": torch.tensor(0)}}
        parallel.add_per_rank(checkpoint, per_rank, keys)
        return checkpoint

    checkpoint = written()
    assert checkpoint["per_rank"] is per_rank and checkpoint["state_dict"][keys["head"]]["ledger"] == ledger(7)
    mine = parallel.take_per_rank(checkpoint, 1, 2, keys)
    assert checkpoint["state_dict"][keys["head"]] == {"ledger": ledger(4)} and int(mine["acc.tp"]) == 1
    assert int(checkpoint["state_dict"]["acc.tp"]) == 1
    for rank, counters in ((0, ledger(7)), (1, ledger(0))):
        checkpoint = written()
        assert parallel.take_per_rank(checkpoint, rank, 3, keys) is None
        assert checkpoint["state_dict"][keys["head"]]["ledger"] == counters
