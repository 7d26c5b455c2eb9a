"""The Lightning side of stopping a data-parallel run together (the rest: :mod:`astraora.parallel`)."""

from __future__ import annotations

import threading
import time

import lightning as L

from astraora.parallel import should_announce


class StopTogether(L.Callback):
    """Data-parallel runs: one process's failure stops them all (:mod:`astraora.parallel`).

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
        if should_announce(sync, exception):
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
