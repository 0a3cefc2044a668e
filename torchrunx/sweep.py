"""Many runs of one function side by side on a launcher's warm agents, each on devices of its own.

::

    Launcher.sweep(fn, items, workers) ─► Sweep: the queue, the hosts' free slots
        scheduler thread: a queued item + `workers` free slots of one host ─► a run there
        a run's end (its done-callback) ─► its outcome, its slots free ─► the next item

A host has as many slots as the launcher's ``workers_per_host`` there; a run takes ``workers``
slots of one host and sees only their GPUs (or cores, see ``torchrunx.placement``). A run is
placed on the host with the most free slots: a sweep's runs are independent, and what slows them
down is what they share on a host (the cores that feed the GPUs, memory bandwidth, disk), so
they are spread, not packed; packing would only free whole hosts, which a sweep never hands back.
"""

from __future__ import annotations

__all__ = ["Sweep", "SweepRun", "SweepSlots"]

import collections
import concurrent.futures
import contextlib
import importlib
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import AgentFailedError, NotRunError, PreemptedError
from .runs import CANCEL_TIMEOUT_S, RunHandle, ctrl_c_held, say_where_it_was
from .transport.messages import Devices

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .result import LaunchResult

Item = TypeVar("Item")
R = TypeVar("R")

_WAIT_S = 0.2
"""How often a wait for the next outcome lets Ctrl-C in (``queue.get`` without a timeout
cannot be interrupted)."""


@dataclass(frozen=True)
class SweepSlots:
    """Where a sweep's runs may go, and how the launcher starts one there."""

    capacity: dict[str, int]  # slots by host (its workers_per_host), spares left out
    start: Callable[[Any, str, Devices, str], RunHandle[Any]]  # item, host, devices, label
    preempted: Callable[[], bool]  # a preemption notice has come: start nothing more


@dataclass(frozen=True)
class SweepRun:
    """An item of a sweep in flight: where it runs, since when."""

    index: int
    item: object
    hostname: str
    slots: tuple[int, ...]
    started: float  # time.monotonic()

    def __str__(self) -> str:
        seconds = time.monotonic() - self.started
        slots = ",".join(map(str, self.slots))
        return f"#{self.index} {_short(self.item)} on {self.hostname} [{slots}], {seconds:.1f} s"


class Sweep(Generic[Item, R]):
    """The runs of ``Launcher.sweep()``, as they finish.

    Iterate for ``(item, outcome)`` in the order the runs end; ``outcome`` is the run's
    ``LaunchResult``, or the exception ``run()`` would have raised (one item's
    error does not stop the others). ``outcomes()`` gives them in the items' order. Ctrl-C
    while iterating cancels the sweep; ``close()`` lets what runs finish and runs no more.
    """

    def __init__(
        self, items: list[Item], workers: int, slots: SweepSlots, *, progress: bool | None
    ) -> None:
        self._items = items
        self._workers = workers
        self._slots = slots
        self._free = {host: list(range(n)) for host, n in slots.capacity.items()}
        self._queued = collections.deque(range(len(items)))
        self._flight: dict[int, tuple[SweepRun, RunHandle[Any] | None]] = {}
        self._outcomes: dict[int, LaunchResult[R] | BaseException] = {}
        self._ended: queue.SimpleQueue[int] = queue.SimpleQueue()  # indexes, as they end
        self._taken = 0  # outcomes handed out by the iterator
        self._changed = threading.Condition()
        self._stopped = ""  # why no more runs start, once they don't
        self.most_in_flight = 0  # the most runs at once so far
        self._progress = _Progress(len(items), progress)
        self._thread = threading.Thread(target=self._schedule, name="torchrunx-sweep", daemon=True)
        self._thread.start()

    # ---- the caller's side

    def __iter__(self) -> Iterator[tuple[Item, LaunchResult[R] | BaseException]]:
        return self

    def __next__(self) -> tuple[Item, LaunchResult[R] | BaseException]:
        if self._taken == len(self._items):
            raise StopIteration
        try:
            index = self._next_ended()
        except KeyboardInterrupt as e:
            self.cancel()
            raise e.with_traceback(None) from None  # the user's loop, not how we waited
        self._taken += 1
        return self._items[index], self._outcomes[index]

    def _next_ended(self) -> int:
        while True:
            with contextlib.suppress(queue.Empty):
                return self._ended.get(timeout=_WAIT_S)

    def outcomes(self) -> list[tuple[Item, LaunchResult[R] | BaseException]]:
        """Every ``(item, outcome)`` in the items' order, once all have ended (Ctrl-C cancels)."""
        for _ in self:
            pass
        return [(item, self._outcomes[i]) for i, item in enumerate(self._items)]

    def status(self) -> list[SweepRun]:
        """The items in flight now: which runs where, on which slots, for how long."""
        with self._changed:
            return [run for run, _ in self._flight.values()]

    def close(self, reason: str = "closed") -> None:
        """Start no more runs: the queued end as ``NotRunError``; those in flight finish."""
        with self._changed:
            if not self._stopped:
                self._stopped = reason
            left = list(self._queued)
            self._queued.clear()
            self._changed.notify_all()
        for index in left:
            msg = f"sweep item #{index} {_short(self._items[index])} did not run: sweep {reason}"
            self._end(index, NotRunError(msg, reason=reason), None)

    def cancel(self) -> None:
        """Ctrl-C: nothing more starts; every run in flight is torn down, saying where it was.

        A second Ctrl-C meanwhile changes nothing: the teardown is bounded.
        """
        with ctrl_c_held():
            self.close("cancelled")
            with self._changed:
                flying = [(run, h) for run, h in self._flight.values() if h is not None]
            with concurrent.futures.ThreadPoolExecutor(max(1, len(flying))) as pool:
                list(pool.map(lambda f: f[1].cancel(), flying, timeout=CANCEL_TIMEOUT_S + 5))
            for run, handle in flying:  # all torn down at once above, then each one's report
                say_where_it_was(handle, str(run))

    # ---- the scheduler's thread

    def _schedule(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(self._ready)
                preempted = self._slots.preempted()
                if self._stopped or not self._queued or preempted:
                    break
                host = self._host()
                assert host is not None  # noqa: S101 -- _ready said one fits
                index = self._queued.popleft()
                slots = tuple(self._free[host][: self._workers])
                del self._free[host][: self._workers]
                run = SweepRun(index, self._items[index], host, slots, time.monotonic())
                self._flight[index] = (run, None)
                self.most_in_flight = max(self.most_in_flight, len(self._flight))
            self._start(run)
        if preempted:  # in-flight runs have the notice and their grace; the queued never start
            self.close("preempted")

    def _ready(self) -> bool:
        # a notice with every slot busy: the runs in flight end (preempted), and notify
        return bool(self._stopped) or not self._queued or self._host() is not None

    def _host(self) -> str | None:
        """The host with the most free slots, if one has enough for a run."""
        host, free = max(self._free.items(), key=lambda kv: len(kv[1]), default=("", []))
        return host if len(free) >= self._workers else None

    def _start(self, run: SweepRun) -> None:
        devices = Devices(run.slots, self._slots.capacity[run.hostname])
        try:
            handle = self._slots.start(run.item, run.hostname, devices, f"#{run.index}")
        except Exception as e:  # noqa: BLE001 -- the item's outcome: the others go on
            self._finished(run, e)
            return
        with self._changed:  # before the callback, which may run at once: it takes it out
            self._flight[run.index] = (run, handle)
        handle.add_done_callback(lambda done: self._finished(run, _outcome(done)))

    def _finished(self, run: SweepRun, outcome: LaunchResult[R] | BaseException) -> None:
        """A run ended (a done-callback: never blocks): its slots go back, the next may start."""
        lost = isinstance(outcome, AgentFailedError) and outcome.hostname == run.hostname
        with self._changed:
            self._flight.pop(run.index, None)
            if lost:  # its slots leave the sweep: what is queued goes elsewhere
                self._free.pop(run.hostname, None)
            elif run.hostname in self._free:
                self._free[run.hostname] = sorted([*self._free[run.hostname], *run.slots])
            self._changed.notify_all()
        self._end(run.index, outcome, run)
        if isinstance(outcome, PreemptedError):
            self.close("preempted")
        elif not self._free:
            self.close("without a host: every host of the sweep was lost")

    def _end(
        self, index: int, outcome: LaunchResult[R] | BaseException, run: SweepRun | None
    ) -> None:
        self._outcomes[index] = outcome
        name = str(run) if run is not None else f"#{index} {_short(self._items[index])}"
        self._progress.ended(outcome, len(self._flight), name)
        self._ended.put(index)


def _outcome(done: concurrent.futures.Future[Any]) -> Any:
    if done.cancelled():
        return concurrent.futures.CancelledError("cancelled with the sweep")
    error = done.exception()
    return done.result() if error is None else error.with_traceback(None)


def _short(item: object, width: int = 30) -> str:
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."


class _Progress:
    """Items done, failed and in flight: a tqdm bar on a terminal, else a line per item."""

    def __init__(self, total: int, show: bool | None) -> None:
        self.total = total
        self.done = self.failed = self.not_run = 0
        self.show = total > 0 and (show is None or show)
        self.bar: Any = None
        if self.show and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                tqdm = importlib.import_module("tqdm")  # optional
                self.bar = tqdm.tqdm(total=total, desc="sweep", unit="run", file=sys.stderr)
        self._lock = threading.Lock()

    def ended(self, outcome: object, flying: int, name: str) -> None:
        with self._lock:
            self.done += 1
            stopped = isinstance(outcome, (NotRunError, concurrent.futures.CancelledError))
            self.not_run += stopped
            self.failed += isinstance(outcome, BaseException) and not stopped
            if not self.show:
                return
            summary = f"{self.failed} failed, {flying} running"
            summary += f", {self.not_run} not run" if self.not_run else ""
            if self.bar is not None:
                self.bar.set_postfix_str(summary, refresh=False)
                self.bar.update(1)
                if self.done == self.total:
                    self.bar.close()
                return
            what = "returned" if not isinstance(outcome, BaseException) else type(outcome).__name__
            line = f"torchrunx sweep: {self.done}/{self.total} done ({summary}): {name} {what}"
            print(line, file=sys.stderr, flush=True)  # noqa: T201
