"""The forkserver: imports torch once, then forks a fresh worker process for every rank of a run.

::

    agent ──socketpair──► forkserver (torch imported, CUDA never initialised)
      ▲   run: spec, payload, stdout/stderr pipes      │ fork()
      │                                                ▼
      └──── forked {pid}, exited {pid, status} ◄──── worker (setsid, one run only)

It is the workers' parent and a child subreaper, so it reaps every process a worker leaves behind,
and it reports each exit to the agent the moment ``SIGCHLD`` arrives. It dies with the agent
(``PR_SET_PDEATHSIG``), and its workers die with it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import sys

from .reaper import set_child_subreaper, set_parent_death_signal
from .stacks import STACK_FD, STACK_SIGNAL
from .transport.messages import Exited, Fork, Forked, Up, WorkerSlot
from .transport.unix import recv_message, send_message

_MAX_FD = 1 << 20
PIPES_PER_WORKER = 3  # stdout, stderr, stacks: write ends, from the agent


_IDLE_S = 0.5  # idle this long, the forkserver warms up (see _warm_up)


def _preload() -> None:
    """Import what every worker needs, so that a fork starts with it in memory."""
    import cloudpickle  # noqa: F401, PLC0415
    import torch  # noqa: PLC0415
    import torch.distributed  # noqa: F401, PLC0415
    import zmq  # noqa: F401, PLC0415

    from . import worker  # noqa: F401, PLC0415


def _warm_up() -> None:
    """What many functions import first thing, loaded while idle (it takes seconds here).

    ``DistributedDataParallel`` pulls in ``torch._dynamo`` (2.5 s on 2 cores): preloaded, every
    run after the first saves that. Done only when no request waits, never before the first fork.
    """
    for module in ("torch._dynamo", "torch.nn.parallel"):
        with contextlib.suppress(Exception):  # an optional speed-up: a failure costs nothing
            importlib.import_module(module)


def _fork_worker(fork: Fork, slot: WorkerSlot, payload: memoryview, fds: list[int]) -> int:
    """A worker with ``fds`` (stdout, stderr and stack pipes) as its fds 1, 2 and 3."""
    pid = os.fork()
    if pid == 0:  # the worker: forget the forkserver's signal set-up and descriptors
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        out, err, stacks = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(stacks, STACK_FD)
        os.closerange(STACK_FD + 1, _MAX_FD)

        from .worker import run_worker  # noqa: PLC0415

        run_worker(fork, slot, payload)  # never returns
    return pid


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send_message(sock, Exited(pid=pid, status=status))


def serve(sock: socket.socket) -> None:
    """Fork workers on request until the agent closes the socket."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler makes the wakeup fd fire
    # inherited by the workers: a stack request that comes before a worker has its dump handler
    # must not kill it (a real-time signal's default action)
    signal.signal(STACK_SIGNAL, signal.SIG_IGN)
    send_message(sock, Up(pid=os.getpid()))
    sock_fd = sock.fileno()
    warm = False
    while True:
        readable, _, _ = select.select([sock_fd, wake_r], [], [], None if warm else _IDLE_S)
        if not readable and not warm:
            _warm_up()
            warm = True
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            _reap(sock)
        if sock_fd in readable:
            try:
                fork, payload, fds = recv_message(sock)
            except EOFError:
                return
            if isinstance(fork, Fork):
                _fork_run(sock, fork, memoryview(payload), fds)
            _reap(sock)


def _fork_run(sock: socket.socket, fork: Fork, payload: memoryview, fds: list[int]) -> None:
    """A worker per slot; ``fds`` holds each one's :data:`PIPES_PER_WORKER` pipes, in order."""
    for i, slot in enumerate(fork.spec.workers):
        mine = fds[PIPES_PER_WORKER * i : PIPES_PER_WORKER * (i + 1)]
        pid = _fork_worker(fork, slot, payload, mine)
        for fd in mine:
            os.close(fd)
        send_message(sock, Forked(run=fork.spec.run, local_rank=slot.local_rank, pid=pid))


def main() -> None:
    """Entry point: ``python -m torchrunx.forkserver FD``."""
    set_parent_death_signal()
    set_child_subreaper()
    sock = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    serve(sock)


if __name__ == "__main__":
    main()
