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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from .environment import source_env_file
from .hosts import interface_of, local_facts
from .logs import readable_line
from .reaper import alive, signal_all
from .transport.messages import decode, encode
from .transport.security import encrypt_client
from .transport.unix import recv_message, send_message

HEARTBEAT_INTERVAL_S = 1.0
"""How often the agent tells the launcher it is alive."""
TAIL_LINES = 20
"""Lines of a worker's output kept for the message of a ``WorkerFailedError``."""
LEFTOVER_GRACE_S = 3.0
"""How long a process left behind by a finished worker gets between SIGTERM and SIGKILL."""
CLEAR_DEADLINE_S = 10.0
"""Longest wait for killed processes to vanish before the run is reported cleared anyway."""
_READ_SIZE = 1 << 16
_READS_PER_EVENT = 16  # at most 1 MiB from one pipe before the loop looks at anything else
_READS_AT_EXIT = 1024  # a dead worker's pipe holds at most what it wrote last (64 KiB here)
_OUTPUT_WINDOW = 8 << 20  # bytes of output the launcher may be behind before we stop reading
_TAIL_BYTES = 8192


@dataclass
class _Worker:
    run: _Run
    rank: int
    local_rank: int
    pipes: dict[int, str]  # read end -> "stdout" | "stderr"
    pipe_inodes: tuple[int, ...] = ()
    pid: int | None = None
    exited: bool = False
    outcome: str | None = None  # "result" | "error", once the agent has it
    died_before_cancel: bool = False
    partial: dict[str, bytes] = field(default_factory=dict)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))


@dataclass
class _Run:
    id: str
    workers: dict[int, _Worker]  # by local rank
    rendezvous: dict[str, Any] | None = None
    connected: set[int] = field(default_factory=set)
    cancelled: bool = False
    leftovers: list[int] = field(default_factory=list)
    clear_started: float | None = None
    escalated: bool = False


class Agent:
    """The agent's state and event loop."""

    def __init__(self, boot: dict[str, Any]) -> None:
        self.hostname: str = boot["hostname"]
        self.secret: str = boot["secret"]
        self.agent_timeout: float = boot["agent_timeout"]
        self.env_file_vars: dict[str, str] = boot.get("env_file_vars", {})
        self.ctx = zmq.Context()
        self.launcher = self.ctx.socket(zmq.DEALER)
        self.launcher.setsockopt(zmq.IDENTITY, bytes.fromhex(boot["identity"]))
        self.launcher.setsockopt(zmq.LINGER, 2000)
        encrypt_client(self.launcher, boot.get("server_key"))
        self.launcher.connect(boot["address"])
        self.address: str = boot["address"]
        self.dir = tempfile.mkdtemp(prefix="torchrunx-agent-")  # mode 0700: the user's only
        self.endpoint = f"ipc://{self.dir}/workers"
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.LINGER, 0)
        self.workers.bind(self.endpoint)
        self.fs_sock, child_sock = socket.socketpair()
        self.forkserver = subprocess.Popen(
            [sys.executable, "-m", "torchrunx.forkserver", str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self.runs: dict[str, _Run] = {}
        self.by_pid: dict[int, _Worker] = {}
        self.by_fd: dict[int, _Worker] = {}
        self.poller = zmq.Poller()
        for s in (self.launcher, self.workers, self.fs_sock, sys.stdin.fileno()):
            self.poller.register(s, zmq.POLLIN)
        self.last_from_launcher = time.monotonic()
        self.next_heartbeat = 0.0
        # flow control: output the launcher has not confirmed yet; past the window we stop
        # reading the workers' pipes (they block, losing nothing) but keep serving everything else
        self.unconfirmed = 0
        self.reading = True

    # ---- the loop

    def serve(self) -> None:
        """Run until the launcher says shutdown, closes our stdin, or goes silent."""
        self.send("hello", {"secret": self.secret, "dir": self.dir, **local_facts()})
        while True:
            now = time.monotonic()
            if now >= self.next_heartbeat:
                self.send("heartbeat")
                self.next_heartbeat = now + HEARTBEAT_INTERVAL_S
            if now - self.last_from_launcher > self.agent_timeout:
                self.warn(f"the launcher was silent for {self.agent_timeout} s: exiting")
                return
            timeout = 5 if any(r.clear_started is not None for r in self.runs.values()) else 500
            for sock, _ in self.poller.poll(timeout):
                if not self.on_readable(sock):
                    return
            self.progress_clearing()

    def on_readable(self, sock: Any) -> bool:
        """Handle one socket or fd that the poller found readable; ``False``: time to exit."""
        if sock is self.launcher:
            return self.on_launcher()
        if sock is self.workers:
            self.on_worker()
        elif sock == self.fs_sock.fileno():  # the poller gives back fds
            self.on_forkserver()
        elif sock == sys.stdin.fileno():
            if not os.read(sock, 4096):
                return False  # lifeline cut: the launcher is gone
        else:
            self.on_output(sock)
        return True

    def send(self, kind: str, header: dict[str, Any] | None = None, *frames: Any) -> None:
        self.launcher.send_multipart(encode(kind, header, *frames), copy=False)

    def warn(self, text: str) -> None:
        self.send("output", {"level": "WARNING"}, text.encode())

    # ---- launcher

    def on_launcher(self) -> bool:
        kind, header, frames = decode(self.launcher.recv_multipart(copy=False))
        self.last_from_launcher = time.monotonic()
        if kind == "run":
            self.start_run(header, frames)
        elif kind == "rendezvous":
            run = self.runs.get(header["run"])
            if run is not None:
                run.rendezvous = header
                for local_rank in run.connected:
                    self.to_worker(run, local_rank, "rendezvous", header)
        elif kind == "credit":
            self.on_credit(int(header["bytes"]))
        elif kind == "cancel":
            run = self.runs.get(header["run"])
            if run is not None:
                self.cancel(run)
        elif kind == "shutdown":
            return False
        return True

    def start_run(self, spec: dict[str, Any], frames: list[Any]) -> None:
        run = _Run(spec["run"], {})
        self.runs[run.id] = run
        fds = []
        for w in spec["workers"]:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            worker = _Worker(
                run,
                w["rank"],
                w["local_rank"],
                {out_r: "stdout", err_r: "stderr"},
                (os.fstat(out_r).st_ino, os.fstat(err_r).st_ino),
            )
            run.workers[worker.local_rank] = worker
            for fd in (out_r, err_r):
                os.set_blocking(fd, False)
                self.by_fd[fd] = worker
                if self.reading:
                    self.poller.register(fd, zmq.POLLIN)
            fds += [out_w, err_w]
        env = {**spec["env"], **self.env_file_vars}  # the env file has the last word
        if spec["backend"] == "gloo" and "GLOO_SOCKET_IFNAME" not in env:
            # gloo binds to what the hostname resolves to, which may be 127.0.0.1 on a cluster
            # node: use the interface of the address the other hosts reach this one at
            interface = interface_of(spec["address"])
            if interface is not None:
                env["GLOO_SOCKET_IFNAME"] = interface
        sizes = [len(f.buffer) for f in frames]
        header = {
            **spec,
            "env": env,
            "endpoint": self.endpoint,
            "launcher": self.address,
            "payload_sizes": sizes,
        }
        send_message(self.fs_sock, header, [f.buffer for f in frames], fds)
        for fd in fds:
            os.close(fd)

    # ---- forkserver

    def on_forkserver(self) -> None:
        try:
            header, _, _ = recv_message(self.fs_sock)
        except (EOFError, ConnectionError):
            code = self.forkserver.wait()
            msg = f"the forkserver of {self.hostname} exited with code {code}"
            raise RuntimeError(msg) from None
        if header["kind"] == "forked":
            run = self.runs[header["run"]]
            worker = run.workers[header["local_rank"]]
            worker.pid = header["pid"]
            self.by_pid[worker.pid] = worker
            if run.cancelled:
                signal_all([worker.pid], signal.SIGKILL)
        elif header["kind"] == "exited":
            exited = self.by_pid.pop(header["pid"], None)
            if exited is not None:
                self.on_exit(exited, header["status"])

    def on_exit(self, worker: _Worker, status: int) -> None:
        worker.exited = True
        run = worker.run
        for fd in list(worker.pipes):
            # what it wrote last must reach the launcher before "died"
            self.on_output(fd, _READS_AT_EXIT)
        if worker.outcome is None and (not run.cancelled or worker.died_before_cancel):
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                how = {"signal": signal.Signals(sig).name if sig in signal.valid_signals() else sig}
            else:
                how = {"exitcode": os.WEXITSTATUS(status)}
            tail = [*worker.tail, *(p.decode(errors="replace") for p in worker.partial.values())]
            self.send(
                "died",
                {
                    "run": run.id,
                    "rank": worker.rank,
                    "local_rank": worker.local_rank,
                    "pid": worker.pid,
                    "tail": tail,
                    **how,
                },
            )
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
        kind, header, frames = decode(rest)
        if kind == "hello":
            run.connected.add(worker.local_rank)
            if run.rendezvous is not None:
                self.to_worker(run, worker.local_rank, "rendezvous", run.rendezvous)
        elif kind == "port":
            self.send("port", {"run": run.id, "port": header["port"]})
        elif kind in ("result", "error"):
            for fd in list(worker.pipes):
                self.on_output(fd, _READS_AT_EXIT)  # its output first, then its outcome
            worker.outcome = kind
            if not header.get("direct"):  # a direct result is at the launcher already
                header.update(run=run.id, rank=worker.rank, local_rank=worker.local_rank)
                self.send(kind, header, *frames)
            self.to_worker(run, worker.local_rank, "ack", {})
            if kind == "error":
                self.cancel(run)

    def to_worker(self, run: _Run, local_rank: int, kind: str, header: dict[str, Any]) -> None:
        identity = f"{run.id}:{local_rank}".encode()
        with contextlib.suppress(zmq.ZMQError):
            self.workers.send_multipart([identity, *encode(kind, header)])

    def on_output(self, fd: int, max_reads: int = _READS_PER_EVENT) -> None:
        """Forward what a worker wrote, whole lines only (a partial line waits for its end)."""
        worker = self.by_fd.get(fd)
        if worker is None:
            return
        stream = worker.pipes[fd]
        chunks = []
        eof = False
        for _ in range(max_reads):  # bounded: a flooding worker must not starve the loop
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            chunks.append(data)
        data = worker.partial.pop(stream, b"") + b"".join(chunks)
        if not eof:
            data, newline, rest = data.rpartition(b"\n")
            data += newline
            if rest:
                worker.partial[stream] = rest
        if data:
            last = data[-_TAIL_BYTES:].decode(errors="replace").split("\n")
            worker.tail.extend(readable_line(line) for line in last if line)
            run, rank, local_rank = worker.run.id, worker.rank, worker.local_rank
            header = {"run": run, "rank": rank, "local_rank": local_rank, "stream": stream}
            self.send("output", header, data)
            self.on_credit(-len(data))
        if eof:
            if self.reading:
                self.poller.unregister(fd)
            os.close(fd)
            del worker.pipes[fd]
            del self.by_fd[fd]

    def on_credit(self, confirmed: int) -> None:
        """Count output confirmed by the launcher (negative: sent); pause or resume reading."""
        self.unconfirmed -= confirmed
        if self.reading and self.unconfirmed > _OUTPUT_WINDOW:
            self.reading = False
            for fd in self.by_fd:
                self.poller.unregister(fd)
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
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        signal_all(self.processes_of(run), signal.SIGKILL)

    def processes_of(self, run: _Run) -> list[int]:
        """Every live process of this run that is not one of its workers.

        All of them end up under the forkserver (it is a subreaper). With no other run on this
        host, every non-worker there is this run's. Otherwise a process is this run's if it
        descends from one of its workers, shares a worker's session, holds one of its output
        pipes (forked children inherit them) or carries its run id (exec'd children do).
        """
        try:
            descendants = psutil.Process(self.forkserver.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        others = [r for r in self.runs.values() if r is not run]
        foreign: set[int] = set()
        for other in others:
            for w in other.workers.values():
                if w.pid is not None and not w.exited:
                    foreign.add(w.pid)
                    with contextlib.suppress(psutil.Error):
                        foreign |= {c.pid for c in psutil.Process(w.pid).children(recursive=True)}
        mine = {w.pid for w in run.workers.values() if w.pid is not None}
        candidates = [p for p in descendants if p.pid not in foreign and p.pid not in mine]
        if not others:
            return [p.pid for p in candidates]
        pipes = {f"pipe:[{ino}]" for w in run.workers.values() for ino in w.pipe_inodes}
        found = []
        for p in candidates:
            with contextlib.suppress(psutil.Error, OSError):
                if (
                    os.getsid(p.pid) in mine
                    or any(a.pid in mine for a in p.parents())
                    or _holds_any(p.pid, pipes)
                    or p.environ().get("TORCHRUNX_RUN_ID") == run.id
                ):
                    found.append(p.pid)
        return found

    def begin_clearing(self, run: _Run) -> None:
        run.leftovers = self.processes_of(run)
        signal_all(run.leftovers, signal.SIGKILL if run.cancelled else signal.SIGTERM)
        run.clear_started = time.monotonic()
        self.progress_clearing()

    def progress_clearing(self) -> None:
        clearing = [(r, r.clear_started) for r in self.runs.values() if r.clear_started is not None]
        for run, started in clearing:
            run.leftovers = alive(run.leftovers)
            waited = time.monotonic() - started
            if run.leftovers and waited > LEFTOVER_GRACE_S and not run.escalated:
                run.escalated = True
                signal_all(run.leftovers, signal.SIGKILL)
            if run.leftovers and waited < CLEAR_DEADLINE_S:
                continue
            if run.leftovers:
                self.warn(f"processes {run.leftovers} of run {run.id} did not exit")
            del self.runs[run.id]
            self.send("cleared", {"run": run.id})

    def close(self) -> None:
        """Kill every run, stop the forkserver, remove our files."""
        for run in self.runs.values():
            self.cancel(run)
        self.forkserver.kill()
        deadline = time.monotonic() + CLEAR_DEADLINE_S
        while self.by_pid and time.monotonic() < deadline:
            signal_all(list(self.by_pid), signal.SIGKILL)
            if not alive(list(self.by_pid)):
                break
            time.sleep(0.01)
        self.forkserver.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ctx.destroy(linger=0)


def _holds_any(pid: int, links: set[str]) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if str(fd.readlink()) in links:
                return True
    return False


def main() -> None:
    """Entry point: ``python -m torchrunx``, with the boot message as the first line of stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    boot = json.loads(sys.stdin.buffer.readline())
    if boot.get("env_file"):
        try:
            boot["env_file_vars"] = source_env_file(boot["env_file"])
        except RuntimeError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(3)
        os.environ.update(boot["env_file_vars"])
    agent = Agent(boot)
    try:
        agent.serve()
    finally:
        agent.close()
