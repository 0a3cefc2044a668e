"""The agent: one per host, long-lived and light (it never imports torch nor unpickles anything).

::

    launcher ──ROUTER◄──DEALER── agent ──socketpair──► forkserver ──fork──► workers
                                   ▲ └──ROUTER (ipc, private dir)◄──DEALER──┘  │
                                   └────────── stdout/stderr pipes ────────────┘

It forwards each run to the forkserver, the workers' output and outcomes to the launcher, and
tears every run down to the last process. Its stdin is its lifeline: EOF (the launcher is gone,
whatever killed it) ends the agent and everything under it. So does silence from the launcher
for longer than ``agent_timeout``.
"""

from __future__ import annotations

__all__ = ["main"]

import contextlib
import dataclasses
import fcntl
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from . import stacks
from .environment import source_env_file
from .forkservers import Forkserver, Forkservers, setup_key
from .hosts import count_gpus, gpu_memory_by_pid, interface_of, local_facts
from .logs import readable_line
from .reaper import Teardown, alive, run_processes, signal_all
from .transport.messages import (
    PROTOCOL_VERSION,
    Ack,
    Boot,
    Cancel,
    Cleared,
    Connect,
    Credit,
    Debug,
    DebugInput,
    Died,
    Dump,
    Exited,
    Fork,
    Forked,
    Heartbeat,
    Hello,
    Imported,
    Message,
    Output,
    Phase,
    Phases,
    Port,
    Raised,
    RankStack,
    RankStatus,
    Rendezvous,
    Result,
    Run,
    RunSpec,
    Stacks,
    Status,
    Unpicklable,
    WireError,
    WorkerSlot,
    decode,
    encode,
    parse,
)
from .transport.security import encrypt_client
from .transport.unix import recv_message, send_message

HEARTBEAT_INTERVAL_S = 1.0
"""How often the agent tells the launcher it is alive."""
TAIL_LINES = 20
"""Lines of a worker's output kept for the message of a ``WorkerFailedError``."""
_READ_SIZE = 1 << 16
_READS_PER_EVENT = 16  # at most 1 MiB from one pipe before the loop looks at anything else
_READS_AT_EXIT = 1024  # a dead worker's pipe holds at most what it wrote last (1 MiB here)
_OUTPUT_WINDOW = 8 << 20  # bytes of output the launcher may be behind before we stop reading
_TAIL_BYTES = 8192
_PIPE_SIZE = 1 << 20  # Linux's default most (/proc/sys/fs/pipe-max-size)
_FLOOD_BYTES = 4 << 10  # read this much at once, a pipe rests (see Agent.rest)
_REST_S = 0.002


@dataclass
class _WorkerProcess:
    run: _Run
    slot: WorkerSlot
    pipes: dict[int, str]  # read end -> "stdout" | "stderr"
    pipe_inodes: tuple[int, ...] = ()
    stack_fd: int = -1  # read end of its stack pipe (see stacks.py)
    pid: int | None = None
    exited: bool = False
    died_before_cancel: bool = False
    partial: dict[str, bytes] = field(default_factory=dict)
    # the last lines of each stream: a flood on one must not push the other's last words out
    tails: dict[str, deque[str]] = field(
        default_factory=lambda: {s: deque(maxlen=TAIL_LINES) for s in ("stdout", "stderr")}
    )
    last_line: str = ""
    last_output: float | None = None  # monotonic
    outcome: str = ""  # "returned" or "failed", once its result or error has reached us
    forked_wall: float = 0.0  # seconds since 1970 (its age; the run's trace)
    exited_wall: float = 0.0
    process: psutil.Process | None = None  # for its memory and CPU (kept: CPU % is a delta)

    @property
    def has_outcome(self) -> bool:
        """Its result or error has reached us."""
        return bool(self.outcome)


@dataclass
class _Run:
    id: str
    workers: dict[int, _WorkerProcess]  # by local rank
    rendezvous: Rendezvous | None = None
    connected: set[int] = field(default_factory=set)
    cancelled: bool = False
    teardown: Teardown | None = None  # of what the workers left, once they have all exited
    spec: RunSpec | None = None  # as its workers have it (the env completed here)
    key: str = ""  # its setup (see forkservers.setup_key)
    fork_sent: float = 0.0  # seconds since 1970, for its trace
    forkserver_pid: int = 0  # the parent of its workers


class Agent:
    """The agent's state and event loop."""

    def __init__(self, boot: Boot, env_file_vars: dict[str, str]) -> None:
        self.hostname = boot.hostname
        self.secret = boot.secret
        self.agent_timeout = boot.agent_timeout
        self.env_file_vars = env_file_vars
        self.ctx = zmq.Context()
        self.launcher = self.ctx.socket(zmq.DEALER)
        self.launcher.setsockopt(zmq.IDENTITY, bytes.fromhex(boot.identity))
        self.launcher.setsockopt(zmq.LINGER, 2000)
        encrypt_client(self.launcher, boot.server_key)
        self.launcher.connect(boot.address)
        self.address = boot.address
        self.dir = tempfile.mkdtemp(prefix="torchrunx-agent-")  # mode 0700: the user's only
        self.endpoint = f"ipc://{self.dir}/workers"
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.LINGER, 0)
        self.workers.bind(self.endpoint)
        self.runs: dict[str, _Run] = {}
        self.by_pid: dict[int, _WorkerProcess] = {}
        self.by_fd: dict[int, _WorkerProcess] = {}
        self.poller = zmq.Poller()
        for s in (self.launcher, self.workers, sys.stdin.fileno()):
            self.poller.register(s, zmq.POLLIN)
        self.forkservers = Forkservers(self.poller, boot.preload, learn=boot.learn)
        self.has_gpus = count_gpus() > 0
        self.last_from_launcher = time.monotonic()
        self.next_heartbeat = 0.0
        # flow control: output the launcher has not confirmed yet; past the window we stop
        # reading the workers' pipes (they block, losing nothing) but keep serving everything else
        self.unconfirmed = 0
        self.reading = True
        self.resting: dict[int, float] = {}  # flooded pipes not polled until then (monotonic)

    # ---- the loop

    def serve(self) -> None:
        """Run until the launcher closes our stdin or goes silent."""
        facts = local_facts(self.dir)
        self.send(Hello(version=PROTOCOL_VERSION, secret=self.secret, facts=facts))
        while True:
            now = time.monotonic()
            if now >= self.next_heartbeat:
                self.send(Heartbeat())
                self.next_heartbeat = now + HEARTBEAT_INTERVAL_S
            if now - self.last_from_launcher > self.agent_timeout:
                self.warn(f"the launcher was silent for {self.agent_timeout} s: exiting")
                return
            clearing = any(r.teardown is not None for r in self.runs.values())
            timeout = 5 if clearing else 500
            if self.resting:  # wake when the first rest ends
                timeout = min(timeout, math.ceil((min(self.resting.values()) - now) * 1000))
            for sock, _ in self.poller.poll(max(timeout, 0)):
                if not self.on_readable(sock):
                    return
            self.wake_rested()
            self.progress_clearing()

    def on_readable(self, sock: Any) -> bool:
        """Handle one socket or fd that the poller found readable; ``False``: time to exit."""
        if sock is self.launcher:
            self.on_launcher()
        elif sock is self.workers:
            self.on_worker()
        elif (server := self.forkservers.by_fd(sock)) is not None:  # the poller gives back fds
            self.on_forkserver(server)
        elif sock == sys.stdin.fileno():
            return bool(os.read(sock, 4096))  # EOF: the lifeline is cut, the launcher is gone
        else:
            self.on_output(sock)
        return True

    def send(self, message: Message, *frames: Any) -> None:
        self.launcher.send_multipart(encode(message, *frames), copy=False)

    def warn(self, text: str) -> None:
        self.send(Output(level="WARNING"), text.encode())

    # ---- launcher

    def on_launcher(self) -> None:
        message, frames = decode(self.launcher.recv_multipart(copy=False))
        self.last_from_launcher = time.monotonic()
        if isinstance(message, Run):
            self.start_run(message.spec, frames)
        elif isinstance(message, Credit):
            self.on_credit(message.bytes)
        elif isinstance(message, (Rendezvous, Cancel, Dump, DebugInput)):
            run = self.runs.get(message.run)
            if run is not None:
                self.on_run_message(run, message)

    def on_run_message(self, run: _Run, message: Rendezvous | Cancel | Dump | DebugInput) -> None:
        """What the launcher says about one of our runs."""
        if isinstance(message, Rendezvous):
            run.rendezvous = message
            for local_rank in run.connected:
                self.to_worker(run, local_rank, message)
        elif isinstance(message, Cancel):
            self.cancel(run)
        elif isinstance(message, Dump) and message.what == "status":
            self.send_status(run, message.request)
        elif isinstance(message, Dump):
            self.send_stacks(run, message.request)
        elif message.local_rank in run.connected:  # a line for a rank's debugger
            self.to_worker(run, message.local_rank, message)

    def start_run(self, spec: RunSpec, frames: list[Any]) -> None:
        run = _Run(spec.run, {})
        self.runs[run.id] = run
        fds = []
        for slot in spec.workers:
            fds += self.open_pipes(run, slot)
        fork = Fork(
            spec=dataclasses.replace(spec, env=self.worker_env(spec)),
            endpoint=self.endpoint,
            launcher=self.address,
            payload_sizes=tuple(len(f.buffer) for f in frames),
            learn=self.forkservers.learn_enabled,
        )
        run.spec, run.key = fork.spec, setup_key(fork.spec)
        server = self.forkservers.for_run(run.id, run.key)
        run.forkserver_pid, run.fork_sent = server.pid, time.time()
        send_message(server.sock, fork, [f.buffer for f in frames], fds)
        for fd in fds:
            os.close(fd)

    def open_pipes(self, run: _Run, slot: WorkerSlot) -> list[int]:
        """A worker's stdout, stderr and stack pipes: we read them; the write ends are returned."""
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        for fd in (out_w, err_w):
            # room for a flood: its writer rarely waits for us, and we read it in big bites
            with contextlib.suppress(OSError):  # past the user's pipe quota: the default size
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        stack_r, stack_w = _stack_pipe()
        inodes = (os.fstat(out_r).st_ino, os.fstat(err_r).st_ino)
        worker = _WorkerProcess(run, slot, {out_r: "stdout", err_r: "stderr"}, inodes, stack_r)
        run.workers[slot.local_rank] = worker
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.by_fd[fd] = worker
            if self.reading:
                self.poller.register(fd, zmq.POLLIN)
        return [out_w, err_w, stack_w]

    def worker_env(self, spec: RunSpec) -> dict[str, str]:
        env = {**spec.env, **self.env_file_vars}  # the env file has the last word
        if spec.backend == "nccl":
            # the communicator is set up in the background from init_process_group on (the
            # worker passes device_id), overlapping what the function does before its first
            # collective
            env.setdefault("TORCH_NCCL_USE_COMM_NONBLOCKING", "1")
            if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in env:  # the older name of the same
                # the flight recorder: which collective each rank is in, in the autopsy
                env.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
        if spec.backend == "gloo" and "GLOO_SOCKET_IFNAME" not in env:
            # gloo binds to what the hostname resolves to, which may be 127.0.0.1 on a cluster
            # node: use the interface of the address the other hosts reach this one at
            interface = interface_of(spec.address)
            if interface is not None:
                env["GLOO_SOCKET_IFNAME"] = interface
        return env

    # ---- forkserver

    def on_forkserver(self, server: Forkserver) -> None:
        try:
            message, _, _ = recv_message(server.sock)
        except (EOFError, ConnectionError):
            code = server.process.poll()
            if not self.forkservers.lost(server):
                msg = f"a forkserver of {self.hostname} exited (code {code}) with runs in flight"
                raise RuntimeError(msg) from None
            return
        self.forkservers.on_message(server, message)
        while self.forkservers.warnings:
            self.warn(self.forkservers.warnings.pop(0))
        if isinstance(message, Forked):
            run = self.runs[message.run]
            worker = run.workers[message.local_rank]
            worker.pid = message.pid
            worker.forked_wall = time.time()
            self.by_pid[message.pid] = worker
            if run.cancelled:
                signal_all([message.pid], signal.SIGKILL)
        elif isinstance(message, Exited):
            exited = self.by_pid.pop(message.pid, None)
            if exited is not None:
                self.on_exit(exited, message.status)

    def on_exit(self, worker: _WorkerProcess, status: int) -> None:
        worker.exited, worker.exited_wall = True, time.time()
        last_dump = stacks.read_now(worker.stack_fd) if worker.stack_fd >= 0 else ""
        _close_stack_pipe(worker)
        run = worker.run
        for fd in list(worker.pipes):
            # what it wrote last must reach the launcher before "died"
            self.on_output(fd, _READS_AT_EXIT)
        if not worker.has_outcome and (not run.cancelled or worker.died_before_cancel):
            self.send(_death(worker, status, last_dump))
            self.cancel(run)
        if all(w.exited for w in run.workers.values()):
            self.begin_clearing(run)

    # ---- workers

    def on_worker(self) -> None:
        identity, *rest = self.workers.recv_multipart(copy=False)
        run_id, _, local_rank_text = identity.bytes.decode().rpartition(":")
        run = self.runs.get(run_id)
        if run is None:
            return
        worker = run.workers[int(local_rank_text)]
        message, frames = decode(rest)
        if isinstance(message, Connect):
            run.connected.add(worker.slot.local_rank)
            if run.rendezvous is not None:
                self.to_worker(run, worker.slot.local_rank, run.rendezvous)
        elif isinstance(message, Port):
            self.send(Port(run=run.id, port=message.port))
        elif isinstance(message, (Result, Raised, Unpicklable)):
            self.on_outcome(worker, message, frames)
        elif isinstance(message, Debug):
            self.on_debug(worker, message)
        elif isinstance(message, Phases):  # its rank is the socket's, not what it claims
            rank = worker.slot.rank
            phases = tuple(dataclasses.replace(p, rank=rank) for p in message.phases)
            self.send(Phases(run.id, phases))
        elif isinstance(message, Imported) and run.spec is not None:
            self.forkservers.imported(message.modules, run.spec, run.key)

    def on_debug(self, worker: _WorkerProcess, message: Debug) -> None:
        run, slot = worker.run, worker.slot
        if message.state == "skipped":  # a warning: live on the launcher's terminal, logged
            self.send(Output(run=run.id, level="WARNING"), message.text.encode())
            return
        # who sent it is the socket's identity, not what the message claims
        message = dataclasses.replace(
            message, run=run.id, rank=slot.rank, local_rank=slot.local_rank
        )
        self.send(message)

    def on_outcome(
        self, worker: _WorkerProcess, message: Result | Raised | Unpicklable, frames: list[Any]
    ) -> None:
        for fd in list(worker.pipes):
            self.on_output(fd, _READS_AT_EXIT)  # its output first, then its outcome
        worker.outcome = "returned" if isinstance(message, Result) else "failed"
        run, slot = worker.run, worker.slot
        # who sent it is the socket's identity, not what the message claims
        message = dataclasses.replace(
            message, run=run.id, rank=slot.rank, local_rank=slot.local_rank
        )
        if not (isinstance(message, Result) and message.direct):  # a direct one has arrived
            self.send(message, *frames)
        if not isinstance(message, Result):
            # the others first (their stacks, then their end): were this rank let go before,
            # its exit would be their "connection closed by peer"
            self.cancel(run)
        self.to_worker(run, slot.local_rank, Ack())

    def to_worker(self, run: _Run, local_rank: int, message: Message) -> None:
        identity = f"{run.id}:{local_rank}".encode()
        with contextlib.suppress(zmq.ZMQError):
            self.workers.send_multipart([identity, *encode(message)])

    def on_output(self, fd: int, max_reads: int = _READS_PER_EVENT) -> None:
        """Forward what a worker wrote, whole lines only (a partial line waits for its end).

        What its other pipe holds while resting, or when this one is stderr, was most likely
        written before: it goes first, so that a line on stderr after a flood on stdout comes
        after the flood (the poller may name stderr first when both are ready; a stdout event
        does not look at stderr, which keeps a flood's reads as they are).
        """
        worker = self.by_fd.get(fd)
        if worker is None:
            return
        first = worker.pipes.get(fd) == "stderr"
        for other in list(worker.pipes):
            if other != fd and (first or other in self.resting):
                self.forward(other, worker, _READS_AT_EXIT)
        self.forward(fd, worker, max_reads)

    def forward(self, fd: int, worker: _WorkerProcess, max_reads: int) -> None:
        """Read one of ``worker``'s pipes and send on its whole lines."""
        stream = worker.pipes[fd]
        data, eof = _read_available(fd, max_reads)
        if len(data) >= _FLOOD_BYTES and max_reads == _READS_PER_EVENT and not eof:
            self.rest(fd)
        data = worker.partial.pop(stream, b"") + data
        if not eof:
            data, newline, rest = data.rpartition(b"\n")
            data += newline
            if rest:
                worker.partial[stream] = self.redraw(worker, stream, rest)
        if _NOISE in data:
            data = b"".join(x for x in data.splitlines(keepends=True) if _NOISE not in x)
        if data:
            last = data[-_TAIL_BYTES:].decode(errors="replace").split("\n")
            lines = [readable_line(line) for line in last if line]
            worker.tails[stream].extend(lines)
            worker.last_line = lines[-1] if lines else worker.last_line
            worker.last_output = time.monotonic()
            self.send_output(worker, stream, data)
        if eof:
            if self.reading and self.resting.pop(fd, None) is None:
                self.poller.unregister(fd)
            os.close(fd)
            del worker.pipes[fd]
            del self.by_fd[fd]

    def redraw(self, worker: _WorkerProcess, stream: str, line: bytes) -> bytes:
        """A line redrawn with carriage returns (a progress bar) goes out as it is now.

        Only its latest state is kept: the earlier ones are drawn over.
        """
        cut = line.rfind(b"\r")
        if cut < 0:
            return line
        if cut + 1 < len(line):
            self.send_output(worker, stream, line[cut + 1 :], redraw=True)
        return line[cut:]

    def send_output(
        self, worker: _WorkerProcess, stream: str, data: bytes, *, redraw: bool = False
    ) -> None:
        """Send a worker's output on; it counts against the launcher's window."""
        slot, level = worker.slot, "INFO" if stream == "stdout" else "WARNING"
        where = Output(worker.run.id, slot.rank, slot.local_rank, stream, level, redraw=redraw)
        self.send(where, data)
        self.on_credit(-len(data))

    def rest(self, fd: int) -> None:
        """A flood: leave the pipe alone a moment, to read it in bigger bites.

        Its writer goes on into the pipe's room without waking us at every line, and the
        launcher gets fewer, larger messages; the lines are late by at most ``_REST_S``.
        """
        if self.reading and fd not in self.resting:
            self.poller.unregister(fd)
            self.resting[fd] = time.monotonic() + _REST_S

    def wake_rested(self) -> None:
        now = time.monotonic()
        for fd, until in list(self.resting.items()):
            if until <= now:
                del self.resting[fd]
                if self.reading and fd in self.by_fd:
                    self.poller.register(fd, zmq.POLLIN)

    def on_credit(self, confirmed: int) -> None:
        """Count output confirmed by the launcher (negative: sent); pause or resume reading."""
        self.unconfirmed -= confirmed
        if self.reading and self.unconfirmed > _OUTPUT_WINDOW:
            self.reading = False
            for fd in self.by_fd:
                if fd not in self.resting:
                    self.poller.unregister(fd)
            self.resting.clear()
        elif not self.reading and self.unconfirmed <= _OUTPUT_WINDOW // 2:
            self.reading = True
            for fd in self.by_fd:
                self.poller.register(fd, zmq.POLLIN)

    # ---- teardown

    def cancel(self, run: _Run) -> None:
        """Kill every process of the run at once: it failed or was cancelled."""
        if run.cancelled:
            return
        run.cancelled = True
        workers = [w for w in run.workers.values() if w.pid is not None and not w.exited]
        pids = [w.pid for w in workers if w.pid is not None]
        dead = set(pids) - set(alive(pids))
        for w in workers:
            # dead already, not yet reaped: likely the cause of the failure, so still reported
            w.died_before_cancel = w.pid in dead
        self.send_stacks(run, "")  # the autopsy: where every live rank was, before it goes
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        signal_all(self.leftovers_of(run), signal.SIGKILL)

    def send_stacks(self, run: _Run, request: str) -> None:
        """Dump the stacks of the run's live workers (bounded) and send them to the launcher.

        Only workers that have connected are asked: before that, their dump handler may not be
        in place yet (the signal is ignored until it is).
        """
        living = set(alive([w.pid for w in run.workers.values() if w.pid is not None]))
        running = [
            w
            for w in run.workers.values()
            if not w.exited and not w.has_outcome and (w.pid is None or w.pid in living)
        ]
        asked = {
            w.pid: w
            for w in running
            if w.pid is not None and w.slot.local_rank in run.connected and w.stack_fd >= 0
        }
        dumps, silent = stacks.collect(
            {pid: w.stack_fd for pid, w in asked.items()},
            ask=run.spec is not None and run.spec.backend is not None,  # a process group's
        )
        answers = [
            RankStack(asked[pid].slot.rank, asked[pid].slot.local_rank, _as_shown(run, text))
            for pid, text in dumps.items()
        ]
        answers += [
            RankStack(w.slot.rank, w.slot.local_rank, stacks.STARTING)
            for w in running
            if w.pid not in asked
        ]
        ranks = tuple(answers)
        quiet = tuple(sorted(asked[pid].slot.rank for pid in silent))
        self.send(Stacks(run=run.id, request=request, ranks=ranks, silent=quiet))

    def send_status(self, run: _Run, request: str) -> None:
        """How each worker of the run is, now: state, memory, CPU, GPU, last line."""
        gpus = gpu_memory_by_pid() if self.has_gpus else None
        ranks = tuple(self.status_of(run, w, gpus) for _, w in sorted(run.workers.items()))
        self.send(Status(run=run.id, request=request, ranks=ranks))

    def status_of(
        self, run: _Run, worker: _WorkerProcess, gpus: dict[int, int] | None
    ) -> RankStatus:
        rss, cpu = 0, 0.0
        if worker.pid is not None and not worker.exited:
            with contextlib.suppress(psutil.Error):
                worker.process = worker.process or psutil.Process(worker.pid)
                rss = worker.process.memory_info().rss
                cpu = worker.process.cpu_percent()
        if worker.outcome or worker.exited:
            state = worker.outcome or "failed"
        elif worker.pid is None or worker.slot.local_rank not in run.connected:
            state = "starting"
        else:
            state = "running"
        return RankStatus(
            rank=worker.slot.rank,
            hostname=self.hostname,
            local_rank=worker.slot.local_rank,
            pid=worker.pid,
            state=state,
            seconds=time.time() - worker.forked_wall if worker.pid is not None else 0.0,
            rss=rss,
            cpu_percent=cpu,
            gpu_memory=None if gpus is None else gpus.get(worker.pid or -1, 0),
            since_output=None
            if worker.last_output is None
            else time.monotonic() - worker.last_output,
            last_line=worker.last_line,
        )

    def leftovers_of(self, run: _Run) -> list[int]:
        """Every live process of this run that is not one of its workers."""
        others = [r for r in self.runs.values() if r is not run]
        return run_processes(
            run.forkserver_pid,
            workers={w.pid for w in run.workers.values() if w.pid is not None},
            other_workers={
                w.pid for r in others for w in r.workers.values() if w.pid and not w.exited
            },
            pipes={inode for w in run.workers.values() for inode in w.pipe_inodes},
            run_id=run.id,
            alone=not [r for r in others if r.forkserver_pid == run.forkserver_pid],
        )

    def begin_clearing(self, run: _Run) -> None:
        first = signal.SIGKILL if run.cancelled else signal.SIGTERM
        run.teardown = Teardown(self.leftovers_of(run), first)
        self.progress_clearing()

    def progress_clearing(self) -> None:
        for run in list(self.runs.values()):
            if run.teardown is None or not run.teardown.done():
                continue
            if run.teardown.remaining:
                self.warn(f"processes {run.teardown.remaining} of run {run.id} did not exit")
            del self.runs[run.id]
            self.forkservers.cleared(run.id)
            if run.spec is not None and run.spec.trace:
                self.send(Phases(run.id, _agent_phases(run)))
            self.send(Cleared(run=run.id))

    def close(self) -> None:
        """Kill every run, stop the forkservers, remove our files."""
        for run in self.runs.values():
            self.cancel(run)
            for worker in run.workers.values():
                _close_stack_pipe(worker)
        self.forkservers.kill()
        # their forkservers are gone: orphans now, which only the host's init may reap
        Teardown(list(self.by_pid), signal.SIGKILL, reaped=False).wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ctx.destroy(linger=0)


def _agent_phases(run: _Run) -> tuple[Phase, ...]:
    """Each worker's fork and teardown, as this agent saw them."""
    now = time.time()
    phases = []
    for w in run.workers.values():
        if w.forked_wall:
            phases.append(Phase(w.slot.rank, "fork", run.fork_sent, w.forked_wall))
        if w.exited_wall:
            phases.append(Phase(w.slot.rank, "teardown", w.exited_wall, now))
    return tuple(phases)


_NOISE = b"[c10d] The hostname of the client socket cannot be retrieved"
"""torch's TCPStore looks up each client's name for its log and warns, once per peer and run,
wherever there is no reverse DNS (most clusters): nothing anyone can act on, so not passed on."""


def _stack_pipe() -> tuple[int, int]:
    """A worker's stack channel (see stacks.py): our end, and the worker's.

    Non-blocking, so a dump nobody reads never blocks the worker; a socket pair, so that we can
    also ask the worker a question (its last collective).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):  # room for a dump of many threads (best effort)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    fds = ours.detach(), theirs.detach()
    for fd in fds:
        os.set_blocking(fd, False)
    return fds


def _close_stack_pipe(worker: _WorkerProcess) -> None:
    if worker.stack_fd >= 0:
        os.close(worker.stack_fd)
        worker.stack_fd = -1


def _read_available(fd: int, max_reads: int) -> tuple[bytes, bool]:
    """What the pipe holds, and whether its writers are all gone.

    At most ``max_reads`` reads: a flooding worker must not starve the loop.
    """
    chunks: list[bytes] = []
    for _ in range(max_reads):
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            break
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


def _death(worker: _WorkerProcess, status: int, last_dump: str) -> Died:
    exitcode, name = None, None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    else:
        exitcode = os.WEXITSTATUS(status)
    tail: list[str] = []
    for stream in ("stdout", "stderr"):  # stderr last: where a death usually says why
        partial = worker.partial.get(stream, b"").decode(errors="replace")
        lines = [line for line in (*worker.tails[stream], partial) if line]
        tail += lines[-(TAIL_LINES // 2) :]
    return Died(
        run=worker.run.id,
        rank=worker.slot.rank,
        local_rank=worker.slot.local_rank,
        pid=worker.pid or 0,
        tail=tuple(tail),
        exitcode=exitcode,
        signal=name,
        stack=_as_shown(worker.run, last_dump) if name is not None and last_dump else None,
    )


def _as_shown(run: _Run, dump: str) -> str:
    """A stack dump of one of the run's workers, with its files as the launcher names them."""
    spec = run.spec
    return dump if spec is None else stacks.in_launchers_terms(dump, spec.copy, spec.copied_from)


def main() -> None:
    """Entry point: ``python -m torchrunx``, with the boot message as the first line of stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        boot = parse(Boot, sys.stdin.buffer.readline())
    except WireError as e:
        sys.stderr.write(f"this agent cannot start: {e}\n")
        sys.exit(2)
    env_file_vars: dict[str, str] = {}
    if boot.env_file:
        try:
            env_file_vars = source_env_file(boot.env_file)
        except RuntimeError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(3)
        os.environ.update(env_file_vars)
    agent = Agent(boot, env_file_vars)
    try:
        agent.serve()
    finally:
        agent.close()
