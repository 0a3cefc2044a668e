"""The agent: one per host, long-lived and light (it never imports torch nor unpickles anything).

::

    launcher ──ROUTER◄──DEALER── agent ──socketpair──► forkservers ──fork──► workers
                                   ▲ └──ROUTER (ipc, private dir)◄──DEALER──┘  │
                                   └──── stdout/stderr pipes: the output pump ─┘

It forwards each run to a forkserver, the workers' output and outcomes to the launcher, and
tears every run down to the last process. Its stdin is its lifeline: EOF (the launcher is gone,
whatever killed it) ends the agent and everything under it. So does silence from the launcher
for longer than ``agent_timeout``.

``Agent`` is the event loop, and coordinates the agent's parts:

- ``torchrunx.agent_runs``: each run on this host, and each of its worker processes;
- ``torchrunx.agent_output``: the output pump (the workers' pipes, lines, flow control);
- ``torchrunx.agent_forkservers``: the forkservers (the base one, the learned one);
- ``torchrunx.agent_diagnosis``: stacks and status of a run's workers, the report of a death;
- ``torchrunx.reaper``: every kill, and the teardown of what the workers left.
"""

from __future__ import annotations

__all__ = ["main"]

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import zmq

from . import reaper, stacks
from .agent_diagnosis import death, final_dump, stack_pipe, stacks_of, status_of
from .agent_forkservers import Forkserver, Forkservers, setup_key
from .agent_output import OutputPump, WorkerOutput
from .agent_runs import HostRun, WorkerProcess
from .environment import source_env_file
from .hosts import count_gpus, interface_of, local_facts
from .preemption import signal_numbers
from .transport.messages import (
    HEARTBEAT_INTERVAL_S,
    PROTOCOL_VERSION,
    Ack,
    Boot,
    Cancel,
    Cleared,
    Connect,
    Credit,
    Debug,
    DebugInput,
    Dump,
    Exited,
    Fork,
    Forked,
    Go,
    Heartbeat,
    Hello,
    Imported,
    Message,
    Notice,
    Output,
    Phases,
    Port,
    Raised,
    Rendezvous,
    Result,
    Run,
    RunSpec,
    Signalled,
    Unpicklable,
    WireError,
    WorkerSlot,
    decode,
    encode,
    parse,
    parse_worker_identity,
    worker_identity,
)
from .transport.security import encrypt_client
from .transport.unix import recv_message, send_message


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
        self.runs: dict[str, HostRun] = {}
        self.by_pid: dict[int, WorkerProcess] = {}
        self.poller = zmq.Poller()
        for s in (self.launcher, self.workers, sys.stdin.fileno()):
            self.poller.register(s, zmq.POLLIN)
        self.forkservers = Forkservers(
            self.poller, boot.preload, learn=boot.learn, ignore=boot.preempt_signals
        )
        self.signals = _SignalPipe(boot.preempt_signals)  # preemption's: news, not death
        self.poller.register(self.signals.fd, zmq.POLLIN)
        self.noticed = False  # the launcher's preemption notice has come: every rank is told
        self.pump = OutputPump(self.poller, self.send)
        self.has_gpus = count_gpus() > 0
        self.last_from_launcher = time.monotonic()
        self.next_heartbeat = 0.0

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
            # the next heartbeat wakes us on time, as does a rest's end
            until_heartbeat = max(math.ceil((self.next_heartbeat - now) * 1000), 1)
            timeout = self.pump.timeout(min(5 if clearing else 500, until_heartbeat), now)
            for sock, _ in self.poller.poll(max(timeout, 0)):
                if not self.on_readable(sock):
                    return
            self.pump.wake_rested()
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
        elif sock == self.signals.fd:
            for name in self.signals.read():
                self.send(Signalled(signal=name))
        else:
            self.pump.on_output(sock)
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
            self.pump.on_credit(message.bytes)
        elif isinstance(message, Notice):
            self.on_notice()
        elif isinstance(message, Go) and (run := self.runs.get(message.run)) is not None:
            # to the workers connected now, the others as they connect; as buffers: sent again
            run.go = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
            for local_rank in run.connected:
                self.to_worker(run, local_rank, message, *run.go)
        elif isinstance(message, (Rendezvous, Cancel, Dump, DebugInput)):
            run = self.runs.get(message.run)
            if run is not None:
                self.on_run_message(run, message)

    def on_run_message(
        self, run: HostRun, message: Rendezvous | Cancel | Dump | DebugInput
    ) -> None:
        """What the launcher says about one of our runs."""
        if isinstance(message, Rendezvous):
            run.rendezvous = message
            for local_rank in run.connected:
                self.to_worker(run, local_rank, message)
        elif isinstance(message, Cancel):
            self.cancel(run)
        elif isinstance(message, Dump) and message.what == "status":
            self.send(status_of(run, message.request, self.hostname, has_gpus=self.has_gpus))
        elif isinstance(message, Dump):
            self.send(stacks_of(run, message.request))
        elif message.local_rank in run.connected:  # a line for a rank's debugger
            self.to_worker(run, message.local_rank, message)

    def on_notice(self) -> None:
        """The run is preempted: every worker of every run here is told, and those to come."""
        self.noticed = True
        for run in self.runs.values():
            for worker in run.workers.values():
                stacks.notify(worker.stack_fd)

    def start_run(self, spec: RunSpec, frames: list[Any]) -> None:
        run = HostRun(spec.run, {})
        self.runs[run.id] = run
        fds = []
        for slot in spec.workers:
            fds += self.add_worker(run, slot)
        fork = Fork(
            spec=dataclasses.replace(spec, env=_worker_env(spec, self.env_file_vars)),
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

    def add_worker(self, run: HostRun, slot: WorkerSlot) -> list[int]:
        """A worker of ``run``, before its fork: the write ends of its stdout, stderr and stacks."""
        output = WorkerOutput(run.id, slot.rank, slot.local_rank)
        write_ends = self.pump.open(output)
        stack_r, stack_w = stack_pipe()
        if self.noticed:  # waiting on its channel when it starts
            stacks.notify(stack_r)
        run.workers[slot.local_rank] = WorkerProcess(run, slot, output, stack_r)
        return [*write_ends, stack_w]

    # ---- forkservers

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
        self.pass_on_warnings()
        if isinstance(message, Forked):
            self.on_forked(message)
        elif isinstance(message, Exited):
            exited = self.by_pid.pop(message.pid, None)
            if exited is not None:
                self.on_exit(exited, message.status)

    def pass_on_warnings(self) -> None:
        """What the forkservers have to tell the launcher (an unsafe preload, one stuck)."""
        while self.forkservers.warnings:
            self.warn(self.forkservers.warnings.pop(0))

    def on_forked(self, message: Forked) -> None:
        run = self.runs[message.run]
        worker = run.workers[message.local_rank]
        worker.pid = message.pid
        worker.forked_wall = time.time()
        self.by_pid[message.pid] = worker
        if run.cancelled:  # cancelled while its fork was on its way
            reaper.kill_now([message.pid])

    def on_exit(self, worker: WorkerProcess, status: int) -> None:
        worker.exited, worker.exited_wall = True, time.time()
        last_dump = final_dump(worker)
        run = worker.run
        self.pump.drain(worker.output)  # what it wrote last must reach the launcher first
        if not worker.has_outcome and (not run.cancelled or worker.died_before_cancel):
            self.send(death(worker, status, last_dump))
            self.cancel(run)
        if all(w.exited for w in run.workers.values()):
            self.begin_clearing(run)

    # ---- workers

    def on_worker(self) -> None:
        identity, *rest = self.workers.recv_multipart(copy=False)
        run_id, local_rank = parse_worker_identity(identity.bytes)
        run = self.runs.get(run_id)
        if run is None or local_rank not in run.workers:
            return
        worker = run.workers[local_rank]
        message, frames = decode(rest)
        if isinstance(message, Connect):
            run.connected.add(worker.slot.local_rank)
            if run.rendezvous is not None:
                self.to_worker(run, worker.slot.local_rank, run.rendezvous)
            if run.go is not None:
                self.to_worker(run, worker.slot.local_rank, Go(run.id), *run.go)
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

    def on_debug(self, worker: WorkerProcess, message: Debug) -> None:
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
        self, worker: WorkerProcess, message: Result | Raised | Unpicklable, frames: list[Any]
    ) -> None:
        self.pump.drain(worker.output)  # its output first, then its outcome
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

    def to_worker(self, run: HostRun, local_rank: int, message: Message, *frames: Any) -> None:
        with contextlib.suppress(zmq.ZMQError):
            identity = worker_identity(run.id, local_rank)
            self.workers.send_multipart([identity, *encode(message, *frames)], copy=False)

    # ---- teardown

    def cancel(self, run: HostRun) -> None:
        """Kill every process of the run at once: it failed or was cancelled."""
        if run.cancelled:
            return
        run.cancelled = True
        workers = [w for w in run.workers.values() if w.pid is not None and not w.exited]
        pids = [w.pid for w in workers if w.pid is not None]
        dead = set(pids) - set(reaper.alive(pids))
        for w in workers:
            # dead already, not yet reaped: likely the cause of the failure, so still reported
            w.died_before_cancel = w.pid in dead
        self.send(stacks_of(run, None))  # the autopsy: where every live rank was, before it goes
        reaper.kill_groups(pids)  # a worker and what it started in its session
        reaper.kill_now(self.leftovers_of(run))

    def leftovers_of(self, run: HostRun) -> list[int]:
        """Every live process of this run that is not one of its workers."""
        others = [r for r in self.runs.values() if r is not run]
        return reaper.run_processes(
            run.forkserver_pid,
            workers={w.pid for w in run.workers.values() if w.pid is not None},
            other_workers={
                w.pid for r in others for w in r.workers.values() if w.pid and not w.exited
            },
            pipes={inode for w in run.workers.values() for inode in w.output.inodes},
            run_id=run.id,
            alone=not [r for r in others if r.forkserver_pid == run.forkserver_pid],
        )

    def begin_clearing(self, run: HostRun) -> None:
        """Its workers have all exited: end what they left (with a grace, unless cancelled)."""
        first = signal.SIGKILL if run.cancelled else signal.SIGTERM
        run.teardown = reaper.Teardown(self.leftovers_of(run), first)
        self.progress_clearing()

    def progress_clearing(self) -> None:
        for run in list(self.runs.values()):
            if run.teardown is None or not run.teardown.done():
                continue
            if run.teardown.remaining:
                self.warn(f"processes {run.teardown.remaining} of run {run.id} did not exit")
            del self.runs[run.id]
            self.forkservers.cleared(run.id)
            self.pass_on_warnings()
            if run.spec is not None and run.spec.trace:
                self.send(Phases(run.id, run.phases()))
            self.send(Cleared(run=run.id))

    def close(self) -> None:
        """Kill every run, stop the forkservers, remove our files."""
        for run in self.runs.values():
            self.cancel(run)
            for worker in run.workers.values():
                worker.close_stack_pipe()
        self.forkservers.kill()
        self.pass_on_warnings()
        # their forkservers are gone: orphans now, which only the host's init may reap
        reaper.Teardown(list(self.by_pid), signal.SIGKILL, reaped=False).wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.ctx.destroy(linger=0)


def _worker_env(spec: RunSpec, env_file_vars: dict[str, str]) -> dict[str, str]:
    """The run's environment as its workers get it: the env file's, and defaults for backends."""
    env = {**spec.env, **env_file_vars}  # the env file has the last word
    if spec.backend == "nccl":
        # the communicator is set up in the background from init_process_group on (the
        # worker passes device_id), overlapping what the function does before its first
        # collective
        env.setdefault("TORCH_NCCL_USE_COMM_NONBLOCKING", "1")
        # the flight recorder's size is set by the worker (worker_stacks.record_collectives):
        # which name a torch reads, only a process that imports it can tell
    if spec.backend == "gloo" and "GLOO_SOCKET_IFNAME" not in env:
        # gloo binds to what the hostname resolves to, which may be 127.0.0.1 on a cluster
        # node: use the interface of the address the other hosts reach this one at
        interface = interface_of(spec.address)
        if interface is not None:
            env["GLOO_SOCKET_IFNAME"] = interface
    return env


class _SignalPipe:
    """Preemption signals to the agent, as bytes on a pipe its poller watches (the wakeup fd)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.fd, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._names = {int(n): n.name for n in signal_numbers(names)}
        for number in self._names:
            signal.signal(number, _nothing)  # a handler of ours: the wakeup fd gets its number
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def read(self) -> list[str]:
        """The preemption signals that came since the last read, by name."""
        try:
            data = os.read(self.fd, 512)
        except BlockingIOError:
            return []
        return [self._names[b] for b in data if b in self._names]


def _nothing(_signum: int, _frame: object) -> None:
    """The handler of a signal that only wakes the loop."""


def main() -> None:
    """Entry point: ``python -m torchrunx.agent``, the boot message as the first line of stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unless a preemption notice
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


if __name__ == "__main__":
    main()
