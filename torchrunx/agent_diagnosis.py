"""Diagnosis on the agent's side: where a run's workers are, how they are, and why one died.

::

    launcher ──Dump (stacks, status)──► agent ──STACK_SIGNAL, a question──► live workers
       ▲                                  │ ◄──── dumps, answers (stack channels) ───┘
       └──── Stacks, Status, Died ────────┤
                                          └── psutil, NVML: a worker's memory, CPU, GPU

Each worker has a stack channel (see ``torchrunx.stacks``): the agent asks for a dump through
it and reads it from it, and reads a worker's last dump once it has died of a signal. Dumps are
sent with the files named as the launcher has them (a host's copy of ``sync_dir`` renamed).
"""

from __future__ import annotations

__all__ = ["death", "final_dump", "stack_pipe", "stacks_of", "status_of"]

import contextlib
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import psutil

from . import stacks
from .hosts import gpu_memory_by_pid
from .reaper import alive
from .sources import in_launchers_terms
from .transport.messages import Died, RankStack, RankState, RankStatus, Stacks, Status

if TYPE_CHECKING:
    from .agent_runs import HostRun, WorkerProcess


def stack_pipe() -> tuple[int, int]:
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


def final_dump(worker: WorkerProcess) -> str:
    """What an exited worker's stack channel holds (its dump as it died of a signal); closed."""
    dump = stacks.read_now(worker.stack_fd) if worker.stack_fd >= 0 else ""
    worker.close_stack_pipe()
    return dump


def stacks_of(run: HostRun, request: str | None) -> Stacks:
    """The stacks of the run's live workers, dumped now (bounded); ``None``: the autopsy.

    Only workers that have connected are asked: before that, their dump handler may not be in
    place yet (the signal is ignored until it is).
    """
    running = _running(run)
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
    quiet = tuple(sorted(asked[pid].slot.rank for pid in silent))
    return Stacks(run=run.id, request=request, ranks=tuple(answers), silent=quiet)


def _running(run: HostRun) -> list[WorkerProcess]:
    """The run's workers still in the function: neither exited nor done, nor dying."""
    living = set(alive([w.pid for w in run.workers.values() if w.pid is not None]))
    return [
        w
        for w in run.workers.values()
        if not w.exited and not w.has_outcome and (w.pid is None or w.pid in living)
    ]


def status_of(run: HostRun, request: str, hostname: str, *, has_gpus: bool) -> Status:
    """How each worker of the run is, now: state, memory, CPU, GPU, last line."""
    gpus = gpu_memory_by_pid() if has_gpus else None
    ranks = tuple(_rank_status(run, w, hostname, gpus) for _, w in sorted(run.workers.items()))
    return Status(run=run.id, request=request, ranks=ranks)


def _rank_status(
    run: HostRun, worker: WorkerProcess, hostname: str, gpus: dict[int, int] | None
) -> RankStatus:
    rss, cpu = 0, 0.0
    if worker.pid is not None and not worker.exited:
        with contextlib.suppress(psutil.Error):
            worker.process = worker.process or psutil.Process(worker.pid)
            rss = worker.process.memory_info().rss
            cpu = worker.process.cpu_percent()
    output = worker.output
    return RankStatus(
        rank=worker.slot.rank,
        hostname=hostname,
        local_rank=worker.slot.local_rank,
        pid=worker.pid,
        state=_state(run, worker),
        seconds=time.time() - worker.forked_wall if worker.pid is not None else 0.0,
        rss=rss,
        cpu_percent=cpu,
        gpu_memory=None if gpus is None else gpus.get(worker.pid or -1, 0),
        since_output=None if output.last_output is None else time.monotonic() - output.last_output,
        last_line=output.last_line,
        attempt=0 if run.spec is None else run.spec.attempt,
    )


def _state(run: HostRun, worker: WorkerProcess) -> RankState:
    if worker.outcome or worker.exited:
        return worker.outcome or "failed"
    if worker.pid is None or worker.slot.local_rank not in run.connected:
        return "starting"
    if run.spec is not None and run.spec.standby and run.go is None:
        return "standby"  # ready, its function not come yet
    return "running"


def death(worker: WorkerProcess, status: int, last_dump: str) -> Died:
    """The report of a worker that exited without an outcome: how, its last words and stack."""
    exitcode, name = None, None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    else:
        exitcode = os.WEXITSTATUS(status)
    return Died(
        run=worker.run.id,
        rank=worker.slot.rank,
        local_rank=worker.slot.local_rank,
        pid=worker.pid or 0,
        tail=worker.output.last_words(),
        exitcode=exitcode,
        signal=name,
        stack=_as_shown(worker.run, last_dump) if name is not None and last_dump else None,
    )


def _as_shown(run: HostRun, dump: str) -> str:
    """A stack dump of one of the run's workers, with its files as the launcher names them."""
    spec = run.spec
    return dump if spec is None else in_launchers_terms(dump, spec.copy, spec.copied_from)
