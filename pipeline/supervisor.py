"""Worker processes: started pinned one per core, restarted when they die (DESIGN §2).

Workers are started with the ``spawn`` method (no inherited ZeroMQ state or file
descriptors). A dead worker is replaced with the same spec: it has the SA keys and nothing
else to recover, since sequence numbers and replay windows live in the I/O process. Processes
are stopped by the PIDs this supervisor started, never by name.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from workers.main import WorkerSpec, run_worker

__all__ = ["Supervisor", "allowed_cpus"]


def allowed_cpus() -> list[int]:
    """The cores this process may use: what a Kubernetes CPU manager granted."""
    return sorted(os.sched_getaffinity(0))


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        self.specs = list(specs)
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess | None] = [None] * len(self.specs)
        self.restarts = 0

    def start(self) -> None:
        for i in range(len(self.specs)):
            self._start(i)

    def _start(self, i: int) -> None:
        proc = self._ctx.Process(target=run_worker, args=(self.specs[i],),
                                 name=f"espline-worker-{i}", daemon=True)
        proc.start()
        self.procs[i] = proc

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.pid is not None]

    def kill(self, index: int) -> None:
        """SIGKILL one worker (hung: it stopped answering); :meth:`check` restarts it."""
        proc = self.procs[index]
        if proc is not None and proc.is_alive():
            proc.kill()  # this PID only
            proc.join(1.0)

    def check(self) -> list[int]:
        """Restart dead workers; returns the indices restarted."""
        restarted = []
        for i, proc in enumerate(self.procs):
            if proc is not None and not proc.is_alive():
                proc.join(0)
                self._start(i)
                self.restarts += 1
                restarted.append(i)
        return restarted

    def stop(self, timeout: float = 3.0) -> None:
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM to this PID
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.procs = [None] * len(self.specs)
