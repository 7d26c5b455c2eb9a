"""Data-parallel faults: when one process stops, every process of the run stops, promptly and with one line.

What can happen to one of the processes, and how the others stop (:class:`astraora.hybrid.RankSync`):

* it raises (a DeviceFailure, or any other error): before it exits it leaves a note for rank 0
  (:meth:`StopTogether.on_exception`); rank 0, waiting in a collective of the physical layers, reads
  it and stops at once, naming it; the others' collectives fail when it exits;
* it is killed (SIGKILL, out of memory): its connections close, so every collective with it fails
  at once, and the processes left raise a PeerFailure instead of gloo's or NCCL's error.

The processes stopped that way exit with code 3 after one line (the failing one as it would alone:
code 3 for a device failure); rank 0, if alive, writes summary.json (status ``device_failure`` when a
device failed, ``peer_failure`` when a process was lost or failed otherwise). No checkpoint is written
from the middle of a step: ``resume=`` continues from the last periodic or epoch checkpoint.
"""

from __future__ import annotations

import threading
import time

import lightning as L

from astraora.errors import AstraoraError, DeviceFailure
from astraora.hybrid import PeerFailure, is_collective_failure


def peer_failure(module, error: BaseException) -> DeviceFailure | None:
    """Under data-parallel training, the error to raise instead of ``error`` where ``error`` is a
    collective that failed because another process stopped (in DDP's gradient all-reduce, in one of
    Lightning's collectives): a :class:`PeerFailure`, or a DeviceFailure where that process's device
    failed. None otherwise: ``error`` is this process's own."""
    sync = getattr(module, "_sync", None)
    if sync is None or isinstance(error, AstraoraError) or not is_collective_failure(error):
        return None
    return sync.stop_error()


def summary_status(error: DeviceFailure) -> str:
    """summary.json's status for a run that stopped on ``error``: ``peer_failure`` where another
    data-parallel process was lost (or failed other than by its device), else ``device_failure``."""
    return "peer_failure" if isinstance(error, PeerFailure) else "device_failure"


class StopTogether(L.Callback):
    """Data-parallel runs: one process's failure stops them all (see the module's docstring).

    Args:
        grace_s: how long rank 0 has to stop by itself after another process exited with an error,
            before Lightning's launcher kills every process (its safety net, kept as the last resort).
    """

    def __init__(self, *, grace_s: float = 30.0):
        self.grace_s = float(grace_s)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and trainer.world_size > 1:
            self.defer_launcher_kill(self.grace_s)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """This process's own failure (not a lost peer's, not an interruption): tell rank 0."""
        sync = getattr(pl_module, "_sync", None)
        if sync is None or sync.stopped is not None or not isinstance(exception, Exception):
            return
        if isinstance(exception, PeerFailure) or is_collective_failure(exception):
            return
        sync.announce(exception)

    @staticmethod
    def defer_launcher_kill(grace_s: float) -> bool:
        """Lightning's launcher (rank 0 starts the other processes of its node) watches them from a
        thread and, as soon as one exits with a non-zero code, SIGKILLs every process, rank 0
        included, within its 5 s polling period: rank 0 would die before it writes summary.json and
        its one line. Give rank 0 ``grace_s`` seconds to stop by itself first. Returns whether the
        launcher's watcher was found (not with SLURM or torchrun, which start the processes)."""
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

        found = False
        for thread in threading.enumerate():
            if not isinstance(thread, _ChildProcessObserver) or not hasattr(thread, "_child_processes"):
                continue
            found = True
            if getattr(thread, "_astraora_deferred", False):
                continue
            check, children, failed_at = thread._run, thread._child_processes, []

            def patient_check(check=check, children=children, failed_at=failed_at) -> bool:
                for proc in children:
                    proc.poll()
                if any(proc.returncode for proc in children):
                    failed_at[:] = failed_at or [time.monotonic()]
                    if time.monotonic() - failed_at[0] < grace_s:
                        return False
                return check()

            thread._run = patient_check
            thread._astraora_deferred = True
        return found
