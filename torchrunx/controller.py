"""The launcher's side of the control plane: the thread that serves agents and runs.

::

    user thread                         controller thread (owns every socket)
    Run.start ── on_thread(start_run) ─wake pipe─► ROUTER ◄──► agents' DEALERs
      ▲                                   │  results, errors, deaths, output, heartbeats
      └──── RunState.done, RunEvents ◄────┘  (agent processes watched: links.AgentWatch)

All state below is touched only by the controller thread; user threads hand it functions
through :meth:`Controller.on_thread` and wait on events. Payloads and results stay opaque bytes
here: the user's thread unpickles them. What a run gathers is its :class:`RunState`; what it
does with its output, debugger sessions and end is its own (:class:`RunEvents`).
"""

from __future__ import annotations

__all__ = ["Controller"]

import contextlib
import functools
import hmac
import logging
import os
import queue
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import zmq

from .links import AgentHandle, AgentWatch
from .logs import Chunk
from .outcome import (
    SILENT,
    AgentLost,
    Failure,
    QuitInDebugger,
    ResultUnpicklable,
    RunCancelled,
    WorkerDied,
    WorkerRaised,
)
from .reaper import remove_private_folder
from .run_state import Inquiry, RunState
from .transport.messages import (
    HEARTBEAT_INTERVAL_S,
    Ack,
    AskFor,
    Cancel,
    Cleared,
    Credit,
    Debug,
    Died,
    DirectResult,
    Dump,
    Heartbeat,
    Hello,
    Message,
    Output,
    Phases,
    Port,
    Raised,
    RankStatus,
    Rendezvous,
    Result,
    Run,
    RunSpec,
    Stacks,
    Status,
    Unpicklable,
    VersionMismatchError,
    WireError,
    decode,
    encode,
)
from .transport.security import encrypt_server, new_server_keys

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger("torchrunx")
T = TypeVar("T")
P = ParamSpec("P")

_ANSWER_TIMEOUT_S = 10.0
"""How long a user thread waits for the controller thread to answer a call."""


class Controller:
    """Owns the ROUTER socket and the thread that serves agents and runs until :meth:`stop`."""

    def __init__(
        self,
        secret: str,
        agent_timeout: float,
        bind_host: str = "127.0.0.1",
        *,
        encrypt: bool = False,
    ) -> None:
        self.thread = threading.Thread(target=self._serve, name="torchrunx-controller", daemon=True)
        self.secret = secret
        self.agent_timeout = agent_timeout
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.server_key: str | None = None  # CURVE public key, when encrypting
        if encrypt:
            self.server_key, server_secret = new_server_keys()
            encrypt_server(self.router, server_secret)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.IPV6, 1)  # remote agents may reach us over IPv6
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self._addresses = {bind_host: self.address}
        self.agents: dict[bytes, AgentHandle] = {}
        self.runs: dict[str, RunState] = {}
        self.changed = threading.Condition()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._poller = zmq.Poller()
        self._poller.register(self.router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._watch = AgentWatch(self._poller, self.fail_agent)
        self._next_heartbeat = 0.0

    # ---- called from user threads

    def start(self) -> None:
        """Start serving (on the controller thread)."""
        self.thread.start()

    def on_thread(self, fn: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
        """Call ``fn(*args, **kwargs)`` on the controller thread, soon."""
        self._calls.put(functools.partial(fn, *args, **kwargs))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """End the thread (after the current iteration) and close the sockets."""
        self._stopping = True
        self.on_thread(_nothing)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)

    def call_and_wait(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the controller thread: its result (or its error, here)."""
        done = threading.Event()
        outcome: list[Any] = []

        def wrapped() -> None:
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except Exception as e:  # noqa: BLE001 -- handed to the caller's thread
                outcome.append((False, e))
            finally:
                done.set()

        self.on_thread(wrapped)
        if not done.wait(_ANSWER_TIMEOUT_S):
            msg = f"the controller thread did not answer within {_ANSWER_TIMEOUT_S} s"
            raise RuntimeError(msg)
        ok, value = outcome[0]
        if not ok:
            raise value
        return cast("T", value)

    def address_on(self, host: str) -> str:
        """An endpoint on the local address ``host`` (bound on first use) for remote agents."""

        def bind() -> str:
            if host not in self._addresses:
                url = f"tcp://[{host}]" if ":" in host else f"tcp://{host}"
                try:
                    port = self.router.bind_to_random_port(url)
                except zmq.ZMQError as e:
                    msg = f"cannot listen on {host} for remote agents: {e}"
                    raise RuntimeError(msg) from e
                self._addresses[host] = f"{url}:{port}"
            return self._addresses[host]

        return self.call_and_wait(bind)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (re-checked on every change) or ``timeout`` passes."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    # ---- agents (controller thread)

    def add_agent(self, agent: AgentHandle) -> None:
        """Watch a newly started agent: its exit (pidfd) and its stderr.

        Call it (on this thread) before the agent gets its boot message, or its hello may come
        first and be dropped as a stranger's.
        """
        self.agents[agent.identity] = agent
        self._watch.add(agent)

    def fail_agent(self, agent: AgentHandle, reason: str) -> None:
        """Mark ``agent`` failed and fail every run it takes part in."""
        if agent.failure is not None:
            return
        self._watch.drain_stderr(agent)
        agent.failure = reason
        if agent.started_by == "local" and agent.facts and agent.process.poll() is not None:
            remove_private_folder(agent.facts.dir)  # it died without cleaning up after itself
        for run in list(self.runs.values()):
            i = run.agent_index(agent)
            if i is not None:
                self._fail(run, AgentLost(agent.hostname, agent.describe_failure()))
                self._cleared(run, i)
        self._notify()

    def send(self, agent: AgentHandle, message: Message, *frames: Any) -> None:
        """Send to one agent; an agent that cannot be reached is failed."""
        if agent.failure is not None:
            return
        try:
            self.router.send_multipart([agent.identity, *encode(message, *frames)], copy=False)
        except zmq.ZMQError as e:
            self.fail_agent(agent, f"the agent on {agent.hostname} cannot be reached ({e})")

    # ---- runs (controller thread)

    def start_run(self, run: RunState, specs: list[RunSpec], payload: list[Any]) -> None:
        """Register ``run`` and send each agent its part."""
        self.runs[run.id] = run
        run.uncleared = set(range(len(run.agents)))
        for i, (agent, spec) in enumerate(zip(run.agents, specs, strict=True)):
            if agent.failure is not None:
                self._fail(run, AgentLost(agent.hostname, agent.describe_failure()))
                self._cleared(run, i)
            else:
                self.send(agent, Run(spec), *payload)

    def dump_stacks(self, run_id: str, timeout: float) -> dict[int, str]:
        """Every live rank's stack, now, without stopping the run (call from a user thread)."""
        dump = self._ask(run_id, "stacks", timeout)
        return {} if dump is None else {**dump.stacks, **dict.fromkeys(dump.silent, SILENT)}

    def status(self, run_id: str, timeout: float) -> dict[int, RankStatus]:
        """How every rank of the run is, now (call from a user thread)."""
        dump = self._ask(run_id, "status", timeout)
        return {} if dump is None else dict(sorted(dump.statuses.items()))

    def _ask(self, run_id: str, what: AskFor, timeout: float) -> Inquiry | None:
        """Ask every agent of the run (``what``: see :class:`Dump`); wait up to ``timeout``."""
        asked = self.call_and_wait(self._inquire, run_id, what)
        if asked is not None:
            asked.done.wait(timeout)
        return asked

    def _inquire(self, run_id: str, what: AskFor) -> Inquiry | None:
        run = self.runs.get(run_id)
        if run is None:
            return None
        request = secrets.token_hex(8)
        asked = run.inquiries[request] = Inquiry(set(range(len(run.agents))))
        for i, agent in enumerate(run.agents):
            if agent.failure is None:
                self.send(agent, Dump(run=run.id, request=request, what=what))
            else:
                asked.answered(i)
        return asked

    def cancel_run(self, run_id: str, reason: str = "cancelled") -> None:
        """Tear a run down everywhere (its failure, if any, stays the first one)."""
        run = self.runs.get(run_id)
        if run is not None:
            self._fail(run, RunCancelled(reason))

    def _fail(self, run: RunState, failure: Failure) -> None:
        first = not run.failures
        run.failures.append(failure)
        if first:
            for agent in run.agents:
                self.send(agent, Cancel(run=run.id))

    def _cleared(self, run: RunState, index: int) -> None:
        if run.cleared(index):
            del self.runs[run.id]
            run.done.set()
            run.events.ended()
            self._notify()

    # ---- the loop

    def _serve(self) -> None:
        """The controller thread: serve until stopped."""
        try:
            while not self._stopping:
                self._tick()
                for sock, _ in self._poller.poll(200):
                    if sock is self.router:
                        self._on_router()
                    elif sock == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self._watch.on_readable(sock)
                while not self._calls.empty():
                    self._calls.get()()
        finally:
            self._watch.close(list(self.agents.values()))
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.ctx.destroy(linger=0)

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
            for agent in list(self.agents.values()):
                if agent.ready:
                    self.send(agent, Heartbeat())
        for agent in list(self.agents.values()):
            if agent.failure is None and now - agent.last_seen > self.agent_timeout:
                what = "sent nothing" if agent.ready else "did not connect"
                self.fail_agent(
                    agent,
                    f"the agent on {agent.hostname} {what} for {self.agent_timeout} s "
                    "(agent_timeout): its host is unreachable or the agent hangs",
                )

    def _on_router(self) -> None:
        while True:
            try:
                identity, *frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            agent = self.agents.get(identity.bytes)
            if agent is not None and agent.failure is not None:
                continue  # given up on: never read further
            try:
                message, rest = decode(frames)
            except VersionMismatchError as e:
                if agent is not None and agent.facts is None:
                    self.fail_agent(agent, f"the agent on {agent.hostname} cannot serve: {e}")
                continue
            except WireError:
                continue
            if agent is None:
                self._on_direct_result(identity.bytes, message, rest)
            elif agent.facts is None:
                self._on_hello(agent, message)
            else:
                agent.last_seen = time.monotonic()
                self._on_message(agent, message, rest)

    def _on_hello(self, agent: AgentHandle, message: Message) -> None:
        if isinstance(message, Hello) and hmac.compare_digest(message.secret, self.secret):
            agent.facts = message.facts
            agent.last_seen, agent.hello_at = time.monotonic(), time.time()
            self._notify()

    def _on_direct_result(self, identity: bytes, message: Message, frames: list[Any]) -> None:
        """A large result sent by a worker straight here, saving the hop through its agent.

        Taken only with the run's token and only once per rank: anything else is dropped unread.
        """
        if not isinstance(message, DirectResult):
            return
        run = self.runs.get(message.run)
        if run is None or not run.take_direct(message, frames):
            return
        with contextlib.suppress(zmq.ZMQError):  # the worker may be gone already
            self.router.send_multipart([identity, *encode(Ack())])

    def _on_message(self, agent: AgentHandle, message: Message, frames: list[Any]) -> None:
        if isinstance(message, Output):
            self._emit(agent, message, frames)
        else:
            self._on_run_message(agent, message, frames)

    def _on_run_message(self, agent: AgentHandle, message: Message, frames: list[Any]) -> None:
        run = self.runs.get(getattr(message, "run", ""))
        if run is None:
            return
        if isinstance(message, (Result, Raised, Unpicklable, Died)):
            self._on_outcome(run, agent, message, frames)
        elif isinstance(message, Port):
            for a in run.agents:
                self.send(a, Rendezvous(run=run.id, master_port=message.port))
        elif isinstance(message, (Phases, Stacks, Status)):
            run.record(agent, message)
        elif isinstance(message, Debug):
            self._on_debug(run, agent, message)
        elif isinstance(message, Cleared):
            i = run.agent_index(agent)
            if i is not None:
                self._cleared(run, i)

    def _on_outcome(
        self,
        run: RunState,
        agent: AgentHandle,
        message: Result | Raised | Unpicklable | Died,
        frames: list[Any],
    ) -> None:
        run.received.setdefault(message.rank, time.time())
        if isinstance(message, Result):
            if not message.direct:  # a direct one is in already
                run.results[message.rank] = frames
            return
        if isinstance(message, Died) and message.stack:  # where it was as it died
            run.evidence.stacks[message.rank] = message.stack
            run.evidence.died.add(message.rank)
        self._fail(run, _failure(agent.hostname, message, frames))

    def _on_debug(self, run: RunState, agent: AgentHandle, message: Debug) -> None:
        if message.state == "quit":  # the user ends the run: as a failure would
            self._fail(run, QuitInDebugger(agent.hostname, message))
        run.events.debug(agent, message)

    def _emit(self, agent: AgentHandle, output: Output, frames: list[Any]) -> None:
        data = frames[0].bytes if frames else b""
        chunk = Chunk.of(agent.hostname, output, data)
        run = None if output.run is None else self.runs.get(output.run)
        if run is not None:
            run.events.output(chunk)
        else:  # the agent's own, outside any run: to whatever handles its logger
            chunk.to_loggers()
        if output.stream is not None:  # worker output: the agent may read that much more
            self.send(agent, Credit(bytes=len(data)))

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _failure(hostname: str, message: Raised | Unpicklable | Died, frames: list[Any]) -> Failure:
    if isinstance(message, Raised):
        return WorkerRaised(hostname, message, frames)
    if isinstance(message, Unpicklable):
        return ResultUnpicklable(hostname, message)
    return WorkerDied(hostname, message)


def _nothing() -> None:
    """A call that only wakes the controller thread."""
