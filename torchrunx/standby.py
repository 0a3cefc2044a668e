"""Standby workers: the next run's processes, forked and ready before the run is asked for.

::

    a run of the launcher's own shape ends ─► Standby.prepare: a Run with no function yet
        its workers: fresh processes, rendezvous, process group made (NCCL's communicator
        warmed), then they wait on their socket (no CPU while idle)
    launcher.run(fn) ─► Standby.take: the same options and places? the standby run gets fn (Go)
                                       else it is cancelled, and fn gets fresh workers as before

Isolation is kept: a standby set is the next run's, not the last one's (no earlier run touched
its processes), and only a run that would have been made exactly alike takes it: the same
hosts and workers, the same environment variables as they are at ``run()``, working directory,
``sys.path``, backend, timeouts and debugger settings. Anything else (a changed variable, a view,
a sweep) gets fresh workers, and the set is replaced after that run. A standby set that fails
while idle (a worker died, a host was lost, a preemption notice) is never handed a run; it is
replaced once. A run of another launcher of this process first ends every other launcher's
standby set: a pipeline of two launchers on the same GPUs never has one stage's CUDA contexts
in the way of the other's memory (a set is made again after its launcher's next run).
"""

from __future__ import annotations

__all__ = ["Standby"]

import threading
import weakref
from typing import TYPE_CHECKING, Any

from .runs import Run

if TYPE_CHECKING:
    from .pool import AgentPool
    from .runs import RunHandle, RunOptions, Statuses


_EVERY: weakref.WeakSet[Standby] = weakref.WeakSet()  # of this process's launchers


class Standby:
    """A pool's one standby set, for the shape of the launcher's last own run."""

    def __init__(self, pool: AgentPool) -> None:
        self._pool = pool
        self._run: Run | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._replaced = False  # a set that failed idle was replaced: not again until a run
        self._making = False  # a set is being made (outside the lock)
        self._drops = 0  # how many times a set was dropped: one being made then is too late
        _EVERY.add(self)

    def others_yield(self) -> None:
        """A run of this launcher starts: other launchers' standby sets go (their memory)."""
        for other in list(_EVERY):
            if other is not self:
                other.drop("another launcher of this process runs")

    def drop(self, reason: str) -> None:
        """End the standby set there is, if any (the next run of ours makes one again)."""
        with self._lock:
            run, self._run = self._run, None
            self._drops += 1
        if run is not None:
            run.cancel(reason)

    def prepare(self, options: RunOptions) -> None:
        """Fork the next run's workers now (a run of ``options`` has just ended)."""
        with self._lock:
            if self._closed or self._run is not None or self._making:
                return
            self._making, drops = True, self._drops
        made = Run(self._pool, options, [], standby=True)
        run: Run | None = made
        try:
            made.start()  # published only once started: its state is there for every caller
        except Exception:  # noqa: BLE001 -- no standby then: the next run starts as before
            run = None
        with self._lock:
            self._making = False
            late = self._closed or self._drops != drops  # dropped while it was being made
            if not late:
                self._run = run
        if late and run is not None:
            run.cancel("dropped while it was being made")

    def take(self, options: RunOptions, payload: list[Any]) -> RunHandle[Any] | None:
        """The standby run, given ``payload``, if it is what a run of ``options`` would be."""
        with self._lock:
            run, self._run = self._run, None
        if run is None:
            return None
        if run.handle.done() or not run.activate(payload, options):
            run.cancel("the standby workers did not match the run")
            return None
        self._replaced = False
        return run.handle

    def lost(self, run: Run, *, cancelled: bool) -> None:
        """``run``, a standby set never given a function, has ended: replace it, once."""
        with self._lock:
            if self._run is not run:
                return
            self._run = None
            again = not (cancelled or self._replaced or self._closed)
            self._replaced = True
        if again:
            self.prepare(run.options)

    def status(self, timeout: float) -> Statuses | None:
        """How the standby workers are (``state`` ``"standby"`` once ready); None: no set."""
        with self._lock:
            run = self._run
        return None if run is None else run.handle.status(timeout)

    def close(self) -> None:
        """No standby set any more (the pool closes): the one there goes."""
        with self._lock:
            self._closed = True
        self.drop("the launcher closed")
