"""The launcher's side of the control plane: agents, runs, and the thread that serves them.

::

    user thread                         controller thread (owns every socket)
    run() ── call(start) ──wake pipe──► ROUTER ◄──► agents' DEALERs
      ▲                                   │  results, errors, deaths, output, heartbeats
      └──────── RunState.done ◄───────────┘  (agent processes watched by pidfd)

All state below is touched only by the controller thread; user threads hand it closures through
:meth:`Controller.call` and wait on events. Payloads and results stay opaque bytes here: the
user's thread unpickles them.
"""

from __future__ import annotations

__all__ = ["AgentHandle", "Controller", "RunState"]

import contextlib
import hmac
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import zmq

from .logs import Chunk
from .outcome import (
    SILENT,
    AgentLost,
    Evidence,
    Failure,
    QuitInDebugger,
    ResultUnpicklable,
    RunCancelled,
    WorkerDied,
    WorkerRaised,
)
from .transport.messages import (
    Ack,
    Cancel,
    Cleared,
    Credit,
    Debug,
    Died,
    DirectResult,
    Dump,
    Heartbeat,
    Hello,
    HostFacts,
    Message,
    Output,
    Phase,
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
from .transport.ssh import RemoteAgentProcess

logger = logging.getLogger("torchrunx")
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 1.0
"""How often the launcher tells its agents it is alive."""
_STDERR_TAIL = 30


@dataclass
class AgentHandle:
    """One agent as the launcher sees it."""

    hostname: str
    process: subprocess.Popen[bytes] | RemoteAgentProcess
    started_by: Literal["local", "ssh", "srun"]  # local: on this machine, our child
    identity: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    facts: HostFacts | None = None
    failure: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_TAIL))
    pidfd: int = -1
    partial_err: bytes = b""
    explain_exit: Callable[[int], str | None] = lambda _code: None
    started_at: float = field(default_factory=time.time)  # seconds since 1970, for traces
    hello_at: float = 0.0

    @property
    def ready(self) -> bool:
        """Connected and authenticated, and not failed."""
        return self.facts is not None and self.failure is None

    def describe_failure(self) -> str:
        """The failure with the last lines the agent wrote to stderr, if any."""
        tail = [line for line in self.stderr_tail if line.strip()]
        text = f"{self.failure}"
        if tail:
            text += "\nlast lines of its stderr:\n  " + "\n  ".join(tail)
        return text


@dataclass
class RunState:
    """One run: what was asked, what came back. Written by the controller thread only."""

    id: str
    agents: list[AgentHandle]
    workers_per_host: list[int]
    emit: Callable[[Chunk], None]
    result_token: str  # proves a worker's direct result belongs to this run
    results: dict[int, list[zmq.Frame]] = field(default_factory=dict)  # pickles, by rank
    failures: list[Failure] = field(default_factory=list)
    evidence: Evidence = field(default_factory=Evidence)  # the autopsy's stacks, among others
    dumps: dict[str, StackDump] = field(default_factory=dict)  # asked for, by request id
    uncleared: set[int] = field(default_factory=set)  # indexes into agents
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[], None] | None = None  # called on the controller thread, once
    on_debug: Callable[[AgentHandle, Debug], None] | None = None  # a rank's debugger session
    phases: list[Phase] = field(default_factory=list)  # for its trace, if it is traced
    received: dict[int, float] = field(default_factory=dict)  # when each rank's outcome came

    def agent_index(self, agent: AgentHandle) -> int | None:
        """Position of ``agent`` in this run, or None."""
        for i, a in enumerate(self.agents):
            if a is agent:
                return i
        return None


@dataclass
class StackDump:
    """Stacks (or statuses) asked of a run in flight: complete when every agent has answered."""

    waiting: set[int]  # indexes into the run's agents
    stacks: dict[int, str] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    statuses: dict[int, RankStatus] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def answered(self, index: int) -> None:
        """Agent ``index`` has answered (or cannot)."""
        self.waiting.discard(index)
        if not self.waiting:
            self.done.set()


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
        self._fds: dict[int, tuple[str, AgentHandle]] = {}
        self._next_heartbeat = 0.0

    # ---- called from user threads

    def start(self) -> None:
        """Start serving (on the controller thread)."""
        self.thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the controller thread, soon."""
        self._calls.put(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """End the thread (after the current iteration) and close the sockets."""
        self._stopping = True
        self.call(lambda: None)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)

    def call_and_wait(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the controller thread and return its result (or raise its error)."""
        done = threading.Event()
        outcome: list[Any] = []

        def wrapped() -> None:
            try:
                outcome.append((True, fn()))
            except Exception as e:  # noqa: BLE001 -- handed to the caller's thread
                outcome.append((False, e))
            finally:
                done.set()

        self.call(wrapped)
        if not done.wait(timeout):
            msg = f"the controller thread did not answer within {timeout} s"
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
        if agent.started_by != "ssh":  # our child: local, or srun here for another node
            agent.pidfd = os.pidfd_open(agent.process.pid)
            self._watch(agent.pidfd, "exit", agent)
        # an SSH agent's exit is the end of its stderr (see RemoteAgentProcess)
        if agent.process.stderr is not None:
            fd = agent.process.stderr.fileno()
            os.set_blocking(fd, False)
            self._watch(fd, "stderr", agent)

    def _watch(self, fd: int, what: str, agent: AgentHandle) -> None:
        self._fds[fd] = (what, agent)
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def fail_agent(self, agent: AgentHandle, reason: str) -> None:
        """Mark ``agent`` failed and fail every run it takes part in."""
        if agent.failure is not None:
            return
        self._drain_stderr(agent)
        agent.failure = reason
        folder = "" if agent.facts is None else agent.facts.dir
        if (
            agent.started_by == "local"
            and agent.process.poll() is not None
            and Path(folder).name.startswith("torchrunx-agent-")
        ):
            # it died without cleaning up after itself: its private folder is ours to remove
            shutil.rmtree(folder, ignore_errors=True)
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

    def _ask(self, run_id: str, what: str, timeout: float) -> StackDump | None:
        """Ask every agent of the run (``what``: see :class:`Dump`); wait up to ``timeout``."""

        def ask() -> StackDump | None:
            run = self.runs.get(run_id)
            if run is None:
                return None
            request = secrets.token_hex(8)
            dump = run.dumps[request] = StackDump(set(range(len(run.agents))))
            for i, agent in enumerate(run.agents):
                if agent.failure is None:
                    self.send(agent, Dump(run=run.id, request=request, what=what))
                else:
                    dump.answered(i)
            return dump

        dump = self.call_and_wait(ask)
        if dump is not None:
            dump.done.wait(timeout)
        return dump

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
        for dump in run.dumps.values():
            dump.answered(index)  # nothing more will come from there for this run
        run.uncleared.discard(index)
        if not run.uncleared:
            del self.runs[run.id]
            run.done.set()
            on_done, run.on_done = run.on_done, None  # it refers to the run: no cycle left
            if on_done is not None:
                on_done()
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
                        self._on_fd(sock)
                while not self._calls.empty():
                    self._calls.get()()
        finally:
            for fd in list(self._fds):
                self._unwatch(fd)
            for agent in self.agents.values():
                if agent.pidfd >= 0:
                    os.close(agent.pidfd)
                if agent.process.stderr is not None:
                    agent.process.stderr.close()
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

    def _on_fd(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return  # unwatched earlier in this same round
        what, agent = entry
        if what == "stderr":
            self._drain_stderr(agent)
        else:
            self._unwatch(fd)
            self._on_exit(agent)

    def _on_exit(self, agent: AgentHandle) -> None:
        code = agent.process.wait()
        self._drain_stderr(agent)
        pid = agent.process.pid if agent.process.pid > 0 or agent.facts is None else agent.facts.pid
        who = f"the agent on {agent.hostname} (pid {pid})"
        explained = agent.explain_exit(code)
        if explained is not None:
            reason = explained
        elif code < 0:
            reason = f"{who} was killed by {signal.Signals(-code).name}"
        elif code == 255 and agent.started_by == "ssh":
            reason = (
                f"{who} is gone: its SSH session ended without an exit status (the agent "
                "was killed, or the connection to the host dropped)"
            )
        else:
            reason = f"{who} exited with code {code}"
        self.fail_agent(agent, reason)

    def _drain_stderr(self, agent: AgentHandle) -> None:
        stream = agent.process.stderr
        if stream is None or stream.closed or stream.fileno() not in self._fds:
            return
        fd = stream.fileno()
        data = agent.partial_err
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self._unwatch(fd)
                stream.close()
                break
            data += chunk
        lines = data.split(b"\n")
        agent.partial_err = lines.pop()
        if stream.closed and agent.partial_err:
            lines.append(agent.partial_err)
        agent.stderr_tail.extend(line.decode(errors="replace") for line in lines)
        if stream.closed and agent.started_by == "ssh":
            self._on_exit(agent)

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
        if (
            run is None
            or not hmac.compare_digest(message.token, run.result_token)
            or not 0 <= message.rank < sum(run.workers_per_host)
            or message.rank in run.results
        ):
            return
        run.results[message.rank] = frames
        run.received[message.rank] = time.time()
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
            run.received.setdefault(message.rank, time.time())
            self._on_outcome(run, agent, message, frames)
        elif isinstance(message, Port):
            for a in run.agents:
                self.send(a, Rendezvous(run=run.id, master_port=message.port))
        elif isinstance(message, Phases):
            run.phases += message.phases
        elif isinstance(message, (Stacks, Status)):
            self._on_answer(run, agent, message)
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
        if run.on_debug is not None:
            run.on_debug(agent, message)

    def _on_answer(self, run: RunState, agent: AgentHandle, message: Stacks | Status) -> None:
        """An agent's stacks (asked for, or the autopsy) or status."""
        if isinstance(message, Status):
            self._on_status(run, agent, message)
        else:
            self._on_stacks(run, agent, message)

    def _on_status(self, run: RunState, agent: AgentHandle, message: Status) -> None:
        asked = run.dumps.get(message.request)
        i = run.agent_index(agent)
        if asked is not None and i is not None:
            asked.statuses.update((r.rank, r) for r in message.ranks)
            asked.answered(i)

    def _on_stacks(self, run: RunState, agent: AgentHandle, message: Stacks) -> None:
        stacks = {s.rank: s.text for s in message.ranks}
        if not message.request:  # the autopsy, before the run's processes were killed
            run.evidence.stacks.update(stacks)
            run.evidence.silent.update(message.silent)
            return
        dump = run.dumps.get(message.request)
        i = run.agent_index(agent)
        if dump is not None and i is not None:
            dump.stacks.update(stacks)
            dump.silent.update(message.silent)
            dump.answered(i)

    def _emit(self, agent: AgentHandle, output: Output, frames: list[Any]) -> None:
        local_rank = output.local_rank
        name = f"torchrunx.{agent.hostname}" + ("" if local_rank is None else f".{local_rank}")
        data = frames[0].bytes if frames else b""
        chunk = Chunk(
            data,
            name=name,
            hostname=agent.hostname,
            local_rank=local_rank,
            rank=output.rank,
            stream=output.stream or "stderr",
            levelno=logging.getLevelName(output.level),
            redraw=output.redraw,
        )
        run = None if output.run is None else self.runs.get(output.run)
        if run is not None:
            run.emit(chunk)
        else:
            for record in chunk.records():
                logging.getLogger(record.name).handle(record)
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
