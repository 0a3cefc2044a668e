"""The forkserver: imports torch once, then forks a fresh worker process for every rank of a run.

::

    agent ──socketpair──► forkserver (torch imported, CUDA never initialised)
      ▲   run: spec, payload, stdout/stderr pipes      │ fork()
      │                                                ▼
      └──── forked {pid}, exited {pid, status} ◄──── worker (setsid, one run only)

It is the workers' parent and a child subreaper, so it reaps every process a worker leaves behind,
and it reports each exit to the agent the moment ``SIGCHLD`` arrives. It dies with the agent
(``PR_SET_PDEATHSIG``), and its workers die with it.

It never does anything slow once it forks: more modules (a ``preload``, what earlier runs
imported) are imported by a *new* forkserver, before its first fork, while this one goes on
serving; the agent then sends runs there (see ``torchrunx.agent_forkservers``). A module
whose import starts a thread or initialises CUDA leaves a forkserver unsafe to fork: that
forkserver says so and is not used.

Its workers' OpenMP threads give up the CPU sooner than in a process started alone (see
``_sharing_cores()``): the workers of a host share its cores.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import sys
from typing import TYPE_CHECKING

from .preemption import signal_numbers
from .reaper import set_child_subreaper, set_parent_death_signal
from .stacks import STACK_FD, STACK_SIGNAL
from .transport.messages import Exited, Fork, Forked, Preload, Preloaded, Up, WorkerSlot
from .transport.unix import recv_message, send_message

if TYPE_CHECKING:
    from collections.abc import Iterator

_MAX_FD = 1 << 20
PIPES_PER_WORKER = 3  # stdout, stderr, stacks: write ends, from the agent
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""The user's say on how OpenMP threads wait: where either is set, it is left as it is."""
THROTTLED_SPINS = "1000"
"""GNU OpenMP's own spin count for more threads than cores (its default: 300,000)."""


@contextlib.contextmanager
def _sharing_cores() -> Iterator[None]:
    """While torch loads GNU OpenMP (which reads its settings then, once): spin less.

    Every worker of a host sizes its OpenMP team to all the host's cores, and an idle thread
    spins before it sleeps; libgomp throttles that when a process has more threads than cores,
    but it cannot see the other workers. Two CPU workers on two cores spent most of a small
    model's forward pass (240 ms, against 50 ms) waiting for a core that the other's threads
    spun on. The variable goes again once loaded: workers and what they start see the run's
    environment only, as in a fresh process.
    """
    if any(name in os.environ for name in OPENMP_WAIT_VARS):
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = THROTTLED_SPINS
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]


def _preload() -> None:
    """Import what every worker needs, so that a fork starts with it in memory."""
    import cloudpickle  # noqa: F401, PLC0415
    import torch  # noqa: PLC0415
    import torch.distributed  # noqa: F401, PLC0415
    import zmq  # noqa: F401, PLC0415

    from . import worker  # noqa: F401, PLC0415


def _threads() -> int:
    """This process's threads (the kernel's count: C libraries start threads of their own)."""
    try:
        return len(os.listdir("/proc/self/task"))  # noqa: PTH208 -- a count, no paths needed
    except OSError:  # no /proc: Python's own count, the best there is
        import threading  # noqa: PLC0415

        return threading.active_count()


def _unsafe(threads: int) -> str:
    """Why a fork from here would not be a clean copy, or ``""``: CUDA, threads beyond ours."""
    cuda = sys.modules.get("torch.cuda")
    if cuda is not None and cuda.is_initialized():
        return "it initialises CUDA"
    now = _threads()
    return f"it starts {now - threads} thread(s)" if now > threads else ""


def _preload_more(sock: socket.socket, preload: Preload, threads: int) -> bool:
    """Import ``preload.modules`` as a worker would; ``False``: this forkserver is of no use.

    Strict (what runs imported): the first module that leaves forking unsafe ends it. Not strict
    (the user's own preload): that is reported, and the rest is imported all the same.
    """
    if preload.env is not None:
        from .worker import enter  # noqa: PLC0415

        enter(preload.env, preload.cwd, preload.sys_path)
    imported: list[str] = []
    failed: list[str] = []
    unsafe = why = ""
    for name in preload.modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 -- a module that fails here is left to the workers
            failed.append(name)
            continue
        imported.append(name)
        if not unsafe and (why := _unsafe(threads)):
            unsafe = name
            if preload.strict:
                break
    send_message(sock, Preloaded(tuple(imported), tuple(failed), unsafe, why))
    return not (unsafe and preload.strict)


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
    """Fork workers on request until the agent closes the socket (or a preload is unsafe)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler makes the wakeup fd fire
    # inherited by the workers: a stack request that comes before a worker has its dump handler
    # must not kill it (a real-time signal's default action)
    signal.signal(STACK_SIGNAL, signal.SIG_IGN)
    threads = _threads()
    send_message(sock, Up(pid=os.getpid()))
    sock_fd = sock.fileno()
    while True:
        readable, _, _ = select.select([sock_fd, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            _reap(sock)
        if sock_fd in readable:
            try:
                message, payload, fds = recv_message(sock)
            except EOFError:
                return
            if isinstance(message, Fork):
                _fork_run(sock, message, memoryview(payload), fds)
            elif isinstance(message, Preload) and not _preload_more(sock, message, threads):
                return  # tainted: the agent uses another forkserver
            _reap(sock)


def _fork_run(sock: socket.socket, fork: Fork, payload: memoryview, fds: list[int]) -> None:
    """A worker per slot; ``fds`` holds each one's ``PIPES_PER_WORKER`` pipes, in order."""
    for i, slot in enumerate(fork.spec.workers):
        mine = fds[PIPES_PER_WORKER * i : PIPES_PER_WORKER * (i + 1)]
        pid = _fork_worker(fork, slot, payload, mine)
        for fd in mine:
            os.close(fd)
        send_message(sock, Forked(run=fork.spec.run, local_rank=slot.local_rank, pid=pid))


def main() -> None:
    """Entry point: ``python -m torchrunx.forkserver FD [SIGNAL,...]``.

    The signals (the launcher's ``preempt_signals``) are ignored: SLURM sends them to every
    process of a step, and a forkserver must outlive them. Its workers inherit that until they
    take the signals themselves (``torchrunx.preemption.take_signals()``).
    """
    set_parent_death_signal()
    set_child_subreaper()
    names = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else []
    for number in signal_numbers(names):
        signal.signal(number, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    with _sharing_cores():
        _preload()
    serve(sock)


if __name__ == "__main__":
    main()
