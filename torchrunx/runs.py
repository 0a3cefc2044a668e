"""A run, on the launcher's side: what it is, how it starts, how its outcome comes back, its end.

::

    Launcher.submit ─► Run(pool, options, payload) ─► start(): specs ─► controller ─► agents
                         │                                      (RunState: what comes back)
                         ◄── ended() ◄── controller thread, when every host has cleared the run
                       _conclude(), on a thread of its own: handlers closed, trace written,
                       outcome.resolve(): a LaunchResult or the exception ─► RunHandle

A ``Run`` is the one home of a run: its options (``RunOptions``), the function and
arguments pickled once, its handle, and what the controller thread gathers of it (a
``RunState``). The pool only starts agents; the controller only moves
messages. ``RunHandle`` is what the user holds: a ``concurrent.futures.Future`` of the
``LaunchResult`` that asks its run for stacks, status and cancellation.
"""

from __future__ import annotations

__all__ = ["CANCEL_TIMEOUT_S", "Run", "RunHandle", "RunOptions", "Statuses"]

import concurrent.futures
import contextlib
import dataclasses
import itertools
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import console, trace
from .errors import AgentFailedError, PreemptedError
from .logs import RunFilesHandler, emit_batch, log_level_from_env
from .outcome import add_note, resolve
from .result import LaunchResult
from .run_state import RunState
from .transport.messages import DebugInput, DebugSettings, Devices, Go, RunSpec, WorkerSlot

if TYPE_CHECKING:
    import logging
    from collections.abc import Iterator

    from .links import AgentHandle
    from .logs import Chunk
    from .outcome import Evidence
    from .pool import AgentPool
    from .transport.messages import Debug, RankStatus

FunctionR = TypeVar("FunctionR")

_EARLY_CHUNKS = 1000  # what standby workers may write before their run: kept until it comes
CANCEL_TIMEOUT_S = 15.0
"""How long ``cancel()`` waits for the run's processes to be gone everywhere."""

HandlersFor = Callable[[list[str], list[int]], "list[logging.Handler]"]
"""A run's log handlers, given its hostnames and workers per host."""


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked to be: its hosts (the pool's, or a view's), workers, env, logs."""

    hostnames: list[str]
    workers_per_host: int | list[int] | str
    backend: str | None
    worker_timeout: float
    env: dict[str, str]  # copied and extra variables, taken afresh for each run
    handlers: HandlersFor
    debug: DebugSettings
    max_restarts: int = 0  # attempts after the first, on fresh workers
    restart_on: tuple[type[BaseException], ...] = ()  # the failures that start one
    devices: Devices | None = None  # a sweep's run: its share of its (one) host
    keep_standby: bool = False  # once it has ended, the next run's workers are made ready

    def alike(self, other: RunOptions) -> bool:
        """Whether a run of ``other`` would be made as one of these (log handlers aside)."""
        mine = dataclasses.replace(self, handlers=_no_handlers)
        return mine == dataclasses.replace(other, handlers=_no_handlers)


def _no_handlers(_hostnames: list[str], _workers: list[int]) -> list[logging.Handler]:
    return []


class Run:
    """One run of a function on a pool's agents, from ``submit`` to its value or exception."""

    def __init__(
        self, pool: AgentPool, options: RunOptions, payload: list[Any], *, standby: bool = False
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.waiting = standby  # standby workers, their function not given yet (see standby.py)
        self.from_standby = standby
        self._early: list[Chunk] = []  # what standby workers wrote before their function came
        self._basis: tuple[Any, ...] = ()  # what its specs were made of, beside its options
        self.pool = pool
        self.options = options
        self.payload = payload  # (function, args, kwargs), pickled once: frames for every host
        self.handle: RunHandle[Any] = RunHandle(self)
        self.state: RunState | None = None  # what the controller gathers of this attempt
        self.hostnames = list(options.hostnames)  # this attempt's
        self.attempt = 0  # restarts so far
        self.restarts: list[BaseException] = []  # the earlier attempts' failures, oldest first
        self._cancelled = False
        self._handlers: list[logging.Handler] = []
        self._submitted = 0.0  # seconds since 1970, for the trace
        self._agent_starts: list[tuple[float, float]] = []  # agents started for this run

    @classmethod
    def submit(cls, pool: AgentPool, payload: list[Any], options: RunOptions) -> RunHandle[Any]:
        """Start the call ``payload`` holds (see ``torchrunx.call``); don't wait."""
        run = cls(pool, options, payload)
        run.start()
        return run.handle

    # ---- how it starts

    def start(self) -> None:
        """Send the run to its hosts' agents (started already): they fork fresh workers."""
        indexes, agents = self.pool.agents_of(self.hostnames)
        workers = workers_per_host(self.options.workers_per_host, agents)
        _check_debug_ranks(self.options.debug, sum(workers))
        self._handlers = [] if self.waiting else self.options.handlers(self.hostnames, workers)
        self._submitted = time.time()
        self._agent_starts = self.pool.starts_for_run(agents)
        self.state = state = RunState(self.id, agents, workers, secrets.token_hex(16), self)
        state.evidence.log_folder = next(
            (h.folder for h in self._handlers if isinstance(h, RunFilesHandler)), None
        )
        specs = self._specs(state, indexes)
        self.pool.runs.add(self)
        self.pool.controller.on_thread(self.pool.controller.start_run, state, specs, self.payload)
        if self._cancelled:  # cancelled while this attempt was being made
            self.cancel()

    def _specs(self, state: RunState, indexes: list[int]) -> list[RunSpec]:
        """Each host's part of the run."""
        pool, options = self.pool, self.options
        offsets = [0, *itertools.accumulate(state.workers_per_host)]
        backend = _backend(options.backend, state.agents)
        traced = trace.folder() is not None
        places = {i: pool.placement(i) for i in indexes}
        self._basis = (traced, log_level_from_env(), tuple(places.values()))
        return [
            RunSpec(
                run=self.id,
                world_size=offsets[-1],
                backend=backend,
                master_addr=pool.host_address(indexes[0]),
                env=options.env,
                cwd=places[i].cwd,
                sys_path=places[i].sys_path,
                worker_timeout=options.worker_timeout,
                result_token=state.result_token,
                log_level=log_level_from_env(),
                server_key=pool.controller.server_key,
                group_rank=g,
                hostname=pool.hostnames[i],
                address=pool.host_address(i),
                local_world_size=n,
                workers=tuple(WorkerSlot(offsets[g] + r, r) for r in range(n)),
                debug=options.debug,
                trace=traced,
                copy=places[i].copy,
                copied_from=places[i].copied_from,
                preempt_signals=pool.config.preempt_signals,
                attempt=self.attempt,
                max_restarts=options.max_restarts,
                devices=options.devices,
                standby=self.waiting,
            )
            for g, (i, n) in enumerate(zip(indexes, state.workers_per_host, strict=True))
        ]

    # ---- while it runs (controller thread: see controller.RunEvents)

    def output(self, chunk: Chunk) -> None:
        """Output of the run's workers: to its handlers (standby: once it has them)."""
        if self.waiting:
            self._early = [*self._early[-_EARLY_CHUNKS:], chunk]
        else:
            emit_batch(self._handlers, chunk)

    # ---- a standby run (see standby.py)

    def activate(self, payload: list[Any], options: RunOptions) -> bool:
        """Give standby workers their function, if a run of ``options`` would be this one."""
        state = self.state
        indexes, _ = self.pool.agents_of(self.hostnames)
        basis = (trace.folder() is not None, log_level_from_env())
        places = tuple(self.pool.placement(i) for i in indexes)
        if state is None or not options.alike(self.options) or (*basis, places) != self._basis:
            return False
        self.payload, self.options = payload, options
        self._handlers = options.handlers(self.hostnames, state.workers_per_host)
        self._submitted = time.time()
        self.pool.controller.on_thread(self._go, state)
        return True

    def _go(self, state: RunState) -> None:
        """(controller thread) The function to every host; what came before it, to the logs."""
        self.waiting = False
        early, self._early = self._early, []
        for chunk in early:
            emit_batch(self._handlers, chunk)
        for agent in state.agents:
            if agent.failure is None:
                self.pool.controller.send(agent, Go(self.id), *self.payload)

    def debug(self, agent: AgentHandle, message: Debug) -> None:
        """A rank's debugger output goes to the terminal; the lines typed there go back to it."""
        controller, finished = self.pool.controller, self.finished

        def reply(answer: DebugInput) -> None:
            controller.on_thread(controller.send, agent, answer)

        console.shared().on_debug(agent.hostname, message, finished, reply)

    def stacks(self, timeout: float) -> dict[int, str]:
        """Every live rank's stack, now (from a user thread)."""
        return self.pool.controller.dump_stacks(self.id, timeout)

    def status(self, timeout: float) -> dict[int, RankStatus]:
        """How every rank is, now (from a user thread)."""
        return self.pool.controller.status(self.id, timeout)

    # ---- how it ends

    @property
    def finished(self) -> threading.Event:
        """Set once no process of the run is left on any host."""
        assert self.state is not None  # noqa: S101 -- a handle exists only for a started run
        return self.state.done

    def cancel(self, reason: str = "cancelled in the launcher") -> None:
        """Tear the run down everywhere (soon; wait on ``finished``); it starts no more."""
        self._cancelled = True
        self.pool.controller.on_thread(self.pool.controller.cancel_run, self.id, reason)

    def ended(self) -> None:
        """Every host has cleared the run (controller thread): conclude it on a thread of its own.

        Unpickling and the user's done-callbacks must neither hold up the controller thread nor
        wait behind another run.
        """
        name = f"torchrunx-run-{self.id}"
        threading.Thread(target=self._conclude, name=name, daemon=True).start()

    def _conclude(self) -> None:
        """The attempt has ended: its value, or its failure, which may start the next one."""
        state = self.state
        assert state is not None  # noqa: S101 -- only a started run ends
        self._close_attempt(state)
        if self.waiting:  # standby workers that never had a function: nobody waits on it
            self.pool.standby.lost(self, cancelled=self._cancelled)
            self.handle.conclude(error=RuntimeError("standby workers ended before their run"))
            return
        try:
            value = resolve(
                state.failures,
                state.results,
                self.hostnames,
                state.workers_per_host,
                state.evidence,
                preemption=state.preemption,
            )
        except BaseException as e:  # noqa: BLE001 -- it belongs to whoever waits on the handle
            self._failed(e)
        else:
            value.restarts = list(self.restarts)
            self._over()
            self.handle.conclude(value)
        self._next_standby()

    def _over(self) -> None:
        # it will not start again: its frames go now, not with the garbage collector (which
        # cannot clear a memoryview that still exports its buffer to another)
        self.payload = []

    def _next_standby(self) -> None:
        """After the handle has its value (its caller goes on at once): the next run's workers."""
        if self.options.keep_standby and not self._cancelled and self.handle.done():
            self.pool.standby.prepare(self.options)  # (not while its next attempt runs)

    def _close_attempt(self, state: RunState) -> None:
        """Its processes are gone everywhere: its logs closed, its trace written."""
        if state.preemption is not None and not self.waiting:  # (a standby set is no run)
            self.pool.requeue()  # the job may go
        for handler in self._handlers:
            handler.close()
        if self.waiting:  # standby workers that never had a function: no run to picture
            return
        began = [s for s, _ in self._agent_starts if s]
        trace.write(
            self.id,
            hostnames=self.hostnames,
            workers_per_host=state.workers_per_host,
            phases=state.phases,
            received=state.received,
            span=(min([self._submitted, *began]), time.time()),
            agents=self._agent_starts,
            attempt=self.attempt,
            path="standby" if self.from_standby and not self.attempt else "fresh",
        )

    def _failed(self, error: BaseException) -> None:
        """Start the next attempt if ``error`` is one to restart on; else the run fails with it."""
        while self._restartable(error):
            self.restarts.append(error)
            self.attempt += 1
            before = self.hostnames
            self.hostnames = self.pool.replace_lost(before)  # a spare takes a lost host's ranks
            retried = [h for h in before if h in self.hostnames and self.pool.is_lost(h)]
            try:
                self.pool.ensure_agents(self.options.env)  # one that died starts again
                self.start()
            except AgentFailedError as e:
                error = e
                if e.hostname in retried:  # it stayed lost: no spare to take its place
                    add_note(e, f"{e.hostname} was lost, and no spare host was left")
                    break
            except Exception as e:  # noqa: BLE001 -- this attempt's failure: maybe restarted
                error = e
            else:
                return
        if self.attempt:
            total = self.options.max_restarts + 1
            add_note(error, f"attempt {self.attempt + 1} of {total}: earlier, {_earlier(self)}")
            with contextlib.suppress(AttributeError, TypeError):  # a type without __dict__
                error.restarts = list(self.restarts)  # type: ignore[attr-defined]
        self._over()
        self.handle.conclude(error=error)

    def _restartable(self, error: BaseException) -> bool:
        return (
            not self._cancelled
            and self.attempt < self.options.max_restarts
            and isinstance(error, self.options.restart_on)
            and not isinstance(error, PreemptedError)
        )


def _earlier(run: Run) -> str:
    return "; ".join(
        f"attempt {i + 1}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for i, e in enumerate(run.restarts)
    )


class Statuses(dict[int, "RankStatus"]):
    """Every rank's ``RankStatus``, by rank; ``str()`` is a table of them."""

    def __str__(self) -> str:
        return "\n".join(str(s) for _, s in sorted(self.items())) or "(no rank answered)"


class RunHandle(concurrent.futures.Future[LaunchResult[FunctionR]]):
    """A run started by ``Launcher.submit``, as a ``concurrent.futures.Future``.

    ``result()`` (raising what ``Launcher.run`` would), ``exception()``, ``done()``, ``cancel()``,
    ``add_done_callback()``; ``concurrent.futures.wait`` and ``as_completed`` take it.
    """

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run_id = run.id
        """The run's id, also ``$TORCHRUNX_RUN_ID`` in its workers."""
        self._run = run
        self._last_status: dict[int, RankStatus] = {}
        self._cancelling = False

    def status(self, timeout: float = 5.0) -> Statuses:
        """How every rank is now, by rank: host, pid, state, memory, CPU, GPU, last output.

        ``state`` is ``starting``, ``running``, ``returned`` or ``failed``; once the run has
        ended everywhere, ``cleared`` (with what the last status said of the rest). Hosts that
        do not answer within ``timeout`` s are left out. Cheap: one message per host.
        """
        if not self._run.finished.is_set():
            self._last_status = self._run.status(timeout) or self._last_status
            if not self._run.finished.is_set():
                return Statuses(self._last_status)
        return Statuses(
            {r: dataclasses.replace(s, state="cleared") for r, s in self._last_status.items()}
        )

    def stacks(self, timeout: float = 5.0) -> dict[int, str]:
        """Every live rank's Python stack (all threads), by rank, without stopping the run.

        Ranks blocked in C (a collective, a sleep) show their Python frames; a rank that cannot
        answer within ``timeout`` s shows why. Once the run has ended: the stacks its ranks had
        when it failed or was cancelled (none if it succeeded).
        """
        if self._run.finished.is_set():
            return self._evidence().all_stacks()
        return self._run.stacks(timeout)

    def autopsy(self) -> str:
        """Where the ranks still running were when the run failed or was cancelled (grouped)."""
        return self._evidence().report()

    def partial_results(self) -> dict[int, Any]:
        """After a failure: what the ranks that had returned returned, by rank."""
        error = self.exception() if self.done() and not self.cancelled() else None
        if error is None:
            return dict(enumerate(self.result().by_rank())) if self.done() else {}
        return dict(getattr(error, "partial_results", {}))

    def failures(self) -> dict[int, BaseException]:
        """After a failure: each failed rank's failure, as the exception it would raise."""
        error = self.exception() if self.done() and not self.cancelled() else None
        return {} if error is None else dict(getattr(error, "failures", {}))

    def cancel(self) -> bool:
        """Kill this run's workers everywhere (other runs and the agents stay); False if done.

        Returns once its processes are gone (at most ``CANCEL_TIMEOUT_S``).
        """
        if self.done():
            return False
        self._cancelling = True  # the run's own end (a "cancelled" failure) must not win
        self._run.cancel()
        self._run.finished.wait(CANCEL_TIMEOUT_S)
        return super().cancel()

    def conclude(
        self, result: LaunchResult[FunctionR] | None = None, error: BaseException | None = None
    ) -> None:
        """Set the result or the exception, unless cancelled (by the run, once it has ended)."""
        if self._cancelling:
            return
        if error is not None:
            self._set(self.set_exception, error)
        else:
            self._set(self.set_result, result)

    def _evidence(self) -> Evidence:
        state = self._run.state
        assert state is not None  # noqa: S101 -- a handle exists only for a started run
        return state.evidence

    def _set(self, setter: Callable[[Any], None], value: Any) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            setter(value)  # unless cancelled meanwhile: the cancellation stands


def _check_debug_ranks(debug: DebugSettings, world_size: int) -> None:
    outside = sorted(r for r in debug.ranks or () if not 0 <= r < world_size)
    if outside:
        msg = (
            f"debug_ranks names ranks {outside}, but this run has ranks 0 to {world_size - 1}: "
            "pass ranks of the run, or 'all'"
        )
        raise ValueError(msg)


def workers_per_host(spec: int | list[int] | str, agents: list[AgentHandle]) -> list[int]:
    if isinstance(spec, int):
        return [spec] * len(agents)
    if isinstance(spec, (list, tuple)):
        return list(spec)
    facts = [a.facts for a in agents if a.facts is not None]
    if spec == "cpu":
        return [f.cpus for f in facts]
    gpus = [f.gpus for f in facts]
    if spec == "gpu":
        missing = [a.hostname for a, g in zip(agents, gpus, strict=True) if g == 0]
        if missing:
            msg = f'workers_per_host="gpu", but no GPU was found on {missing}'
            raise ValueError(msg)
        return gpus
    return [g or 1 for g in gpus]


def _backend(backend: str | None, agents: list[AgentHandle]) -> str | None:
    if backend != "auto":
        return backend
    return "nccl" if all(a.facts is not None and a.facts.gpus for a in agents) else "gloo"


def cancel_reporting(handle: RunHandle[Any]) -> None:
    """Interrupted while waiting (Ctrl-C): the run goes too, saying where its ranks were.

    A second Ctrl-C meanwhile changes nothing: the teardown is bounded, and its report is what
    the first one asked for (the one KeyboardInterrupt raised after it says the rest).
    """
    if handle.done():
        return
    with ctrl_c_held():
        handle.cancel()
        say_where_it_was(handle, "run")


def say_where_it_was(handle: RunHandle[Any], name: str) -> None:
    """On stderr, where a cancelled run's ranks were (before the KeyboardInterrupt's traceback)."""
    report = handle.autopsy()
    if report:
        where = report.replace("\n", "\n  ")
        print(f"torchrunx: {name} cancelled; its ranks were at:\n  {where}", file=sys.stderr)  # noqa: T201


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """SIGINT ignored for the block (from the main thread; elsewhere Python sends none)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
