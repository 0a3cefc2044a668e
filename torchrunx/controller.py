"""The launcher's side of the control plane: the thread that serves agents and runs.

::

    user thread                         controller thread (owns every socket)
    Run.start ── on_thread(start_run) ─wake pipe─► ROUTER ◄──► agents' DEALERs
      ▲                                   │  results, errors, deaths, output, heartbeats
      └──── RunState.done, RunEvents ◄────┘  (agent processes watched: links.AgentWatch)

All state below is touched only by the controller thread (a ``
ServingThread``); user threads hand it functions through ``on_thread`` and wait on events. A
preemption signal (from an agent's ``signalled``, or the launcher's own) becomes one notice,
told to every agent; its grace ends for every run in flight at its deadline or a second signal.
Payloads and results stay opaque bytes here: the user's thread unpickles them. What a run
gathers is its ``RunState``; what it does with its output, debugger sessions and end is its
own (``RunEvents``).
"""

from __future__ import annotations

__all__ = ["Bounds", "Controller"]

import contextlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from .links import AgentHandle, AgentWatch
from .logs import Chunk
from .outcome import (
    SILENT,
    AgentLost,
    Failure,
    Preemption,
    QuitInDebugger,
    ResultUnpicklable,
    RunCancelled,
    RunPreempted,
    WorkerDied,
    WorkerRaised,
)
from .reaper import remove_private_folder
from .run_state import Inquiry, RunState
from .serving import ServingThread
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
    Notice,
    Output,
    Phases,
    Port,
    Raised,
    RankStatus,
    Rendezvous,
    Result,
    Run,
    RunSpec,
    Signalled,
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


@dataclass(frozen=True)
class Bounds:
    """How long the controller waits: for an agent to start, on a silent one, after a notice."""

    agent_timeout: float  # from its start to its hello (SSH, an interpreter, imports)
    heartbeat_timeout: float  # a started agent's silence (it sends a heartbeat every second)
    preempt_grace: float = 0.0  # for the ranks to return after a preemption notice

    def of(self, started: bool) -> tuple[float, str]:
        """The silence an agent is allowed, and the field's name; never more than its start."""
        if started and self.heartbeat_timeout < self.agent_timeout:
            return self.heartbeat_timeout, "heartbeat_timeout"
        return self.agent_timeout, "agent_timeout"


class Controller(ServingThread):
    """Owns the ROUTER socket and the thread that serves agents and runs until ``stop()``."""

    def __init__(self, secret: str, bounds: Bounds, *, encrypt: bool = False) -> None:
        super().__init__("torchrunx-controller")
        self.secret = secret
        self.bounds = bounds
        self._last_tick = time.monotonic()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.server_key: str | None = None  # CURVE public key, when encrypting
        if encrypt:
            self.server_key, server_secret = new_server_keys()
            encrypt_server(self.router, server_secret)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.IPV6, 1)  # remote agents may reach us over IPv6
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"  # for local agents; remote ones: address_on
        self._addresses = {"127.0.0.1": self.address}
        self.agents: dict[bytes, AgentHandle] = {}
        self.runs: dict[str, RunState] = {}
        self.changed = threading.Condition()
        self.poller.register(self.router, zmq.POLLIN)
        self._watch = AgentWatch(self.poller, self.fail_agent)
        self._next_heartbeat = 0.0
        self.preemption: Preemption | None = None  # once a preemption signal has come

    # ---- called from user threads

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
        run.preemption = self.preemption
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
        """Ask every agent of the run (``what``: see ``Dump``); wait up to ``timeout``."""
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

    # ---- preemption (controller thread)

    def preempt(self, source: str, signal_name: str) -> None:
        """A preemption signal reached ``source`` (a host, or ``"launcher"``).

        The first is the notice, for every rank of every run, now and later; the grace starts.
        A second one at the same source (SLURM's at the end of its ``GraceTime``) ends it.
        """
        notice = self.preemption
        if notice is None:
            grace = self.bounds.preempt_grace
            notice = self.preemption = Preemption(grace, deadline=time.monotonic() + grace)
            for agent in list(self.agents.values()):
                if agent.ready:
                    self.send(agent, Notice())
            for run in self.runs.values():
                run.preemption = notice
        again = source in notice.signals
        notice.signals.setdefault(source, []).append(signal_name)
        if again:
            notice.deadline = time.monotonic()
            self._end_grace(f"a second {signal_name} on {source} ended the grace")

    def _end_grace(self, reason: str) -> None:
        for run in list(self.runs.values()):
            if not any(isinstance(f, RunPreempted) for f in run.failures):
                self._fail(run, RunPreempted(reason))

    # ---- the loop

    def on_readable(self, sock: Any) -> None:
        """The ROUTER socket, or an agent's pidfd or stderr."""
        if sock is self.router:
            self._on_router()
        else:
            self._watch.on_readable(sock)

    def closing(self) -> None:
        """Close the agents' watch and every socket."""
        self._watch.close(list(self.agents.values()))
        self.ctx.destroy(linger=0)

    def tick(self) -> None:
        """Heartbeats to the agents, silent agents failed, the end of a preemption's grace."""
        now = time.monotonic()
        notice = self.preemption
        if notice is not None and self.runs and now >= notice.deadline:
            self._end_grace(f"the grace of {notice.grace} s ended")
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
            for agent in list(self.agents.values()):
                if agent.ready:
                    self.send(agent, Heartbeat())
        self._find_silent(now)

    def _find_silent(self, now: float) -> None:
        """Fail the agents silent past their bound (see ``Bounds``)."""
        gap, self._last_tick = now - self._last_tick, now
        if gap > 2 * HEARTBEAT_INTERVAL_S:  # this thread did not run: nobody could be heard
            for agent in self.agents.values():
                agent.last_seen += gap
        for agent in list(self.agents.values()):
            bound, name = self.bounds.of(agent.ready)
            if agent.failure is None and now - agent.last_seen > bound:
                what = "sent nothing" if agent.ready else "did not connect"
                self.fail_agent(
                    agent,
                    f"the agent on {agent.hostname} {what} for {bound} s ({name}): its host "
                    "is unreachable or the agent hangs",
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
            if self.preemption is not None:  # its runs are to know from their start
                self.send(agent, Notice())
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
        elif isinstance(message, Signalled):
            self.preempt(agent.hostname, message.signal)
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
