"""Stack dumps of live workers, the agent's side: asking for them and reading them back.

::

    agent ── STACK_SIGNAL ──► worker: faulthandler (C) writes every thread's stack to fd 3
      ▲                                                         │
      └──────────────── the worker's stack pipe ◄───────────────┘

The signal handler is faulthandler's, written in C (``torchrunx.worker_stacks`` installs it):
a worker answers even when its main thread is blocked in C (a collective, a ``time.sleep``),
holding the GIL or not. A worker that is stopped or stuck in the kernel does not answer;
``collect()`` names it silent at its deadline, and never waits longer.

The stack channel is a socket pair, so it also carries a question the other way: once the dumps
are in, a worker of a run with a process group is asked for its last collective (a byte), and a
thread of the worker answers with one line (``COLLECTIVE``), read from torch's flight
recorder. That thread needs the GIL, which collectives release; a rank that holds it keeps its
line. The launcher summarises the dumps (``torchrunx.stack_report``).

This module also holds what the worker's side and the launcher's side share with it (the signal,
the channel's fd, the line's mark, the deadline); it imports only the standard library.
"""

from __future__ import annotations

__all__ = [
    "ASK",
    "COLLECTIVE",
    "DEADLINE_S",
    "NOTICE",
    "STACK_FD",
    "STACK_SIGNAL",
    "STARTING",
    "collect",
    "notify",
    "read_now",
]

import contextlib
import os
import select
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

STACK_SIGNAL = signal.SIGRTMIN + 3
"""Asks a worker for its stacks: a real-time signal, so no library's own (SIGUSR1 is SLURM's and
Lightning's) is taken."""
STACK_FD = 3
"""The worker's end of its stack pipe."""
QUIET_S = 0.01
"""A dump is complete once its pipe has been quiet this long (faulthandler writes it at once)."""
DEADLINE_S = 1.0
"""How long a worker gets to start answering before it is named silent."""
STARTING = "(starting: not in the function yet)"
"""The "stack" of a worker that has not started the function (nor its dump handler)."""
ASK_S = 0.25
"""How long the workers get to say which collective they are in, once their dumps are in."""
COLLECTIVE = "torchrunx: "
"""Starts the line a worker adds to its dump: the last collective it entered."""
ASK = b"?"
"""Sent to a worker on its channel: which collective are you in (one line back)."""
NOTICE = b"!"
"""Sent to a worker on its channel: the run is preempted (nothing back)."""


def notify(fd: int) -> None:
    """Give the worker of this stack channel the preemption notice (it reads it at once)."""
    with contextlib.suppress(OSError):  # gone: it needs no notice; full: it has one queued
        os.write(fd, NOTICE)


def read_now(fd: int) -> str:
    """What a stack pipe holds now (a dead worker's last dump), without waiting."""
    return _read_all(fd).decode(errors="replace")


def collect(
    pipes: Mapping[int, int], deadline: float = DEADLINE_S, *, ask: bool = False
) -> tuple[dict[int, str], set[int]]:
    """Signal each process of ``pipes`` (pid -> its stack channel's end) and read its dump.

    Returns the dumps by pid, and the pids that wrote nothing within ``deadline`` seconds (a
    process that exits meanwhile is in neither). With ``ask``, each dump ends with the line its
    worker gives about its last collective, where it gives one (see
    ``torchrunx.worker_stacks.answer_asks()``).
    Bounded: at most ``deadline`` plus one quiet period, plus ``ASK_S`` with ``ask``.
    """
    dumps, silent = _dumps(pipes, deadline)
    if ask:
        answered = {pid: fd for pid, fd in pipes.items() if pid in dumps}
        for pid, line in _ask(answered).items():
            dumps[pid] += line
    return {pid: d.decode(errors="replace") for pid, d in dumps.items()}, silent


def _dumps(pipes: Mapping[int, int], deadline: float) -> tuple[dict[int, bytes], set[int]]:
    for fd in pipes.values():
        _read_all(fd)  # what an earlier signal (not ours) left there is not this dump
    dumps = dict.fromkeys(pipes, b"")
    for pid in pipes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, STACK_SIGNAL)
    by_fd = {fd: pid for pid, fd in pipes.items()}
    gone: set[int] = set()
    start = last = time.monotonic()
    while by_fd:
        now = time.monotonic()
        answered = all(dumps[pid] for pid in by_fd.values())
        if (answered and now - last >= QUIET_S) or now - start >= deadline + QUIET_S:
            break
        wait = QUIET_S if answered else min(QUIET_S, deadline - (now - start))
        readable, _, _ = select.select(list(by_fd), [], [], max(wait, 0.001))
        for fd in readable:
            data = _read_all(fd)
            if data:
                dumps[by_fd[fd]] += data
                last = time.monotonic()
            else:  # the worker is gone: no more from it, and no silence to report
                gone.add(by_fd.pop(fd))
    silent = {pid for pid, data in dumps.items() if not data and pid not in gone}
    return {pid: d for pid, d in dumps.items() if d}, silent


def _ask(channels: Mapping[int, int]) -> dict[int, bytes]:
    """Each worker's line about its last collective: those that give one within ``ASK_S``."""
    by_fd: dict[int, int] = {}
    for pid, fd in channels.items():
        with contextlib.suppress(OSError):  # gone, or a channel that is full: no answer
            os.write(fd, ASK)
            by_fd[fd] = pid
    lines: dict[int, bytes] = {}
    end = time.monotonic() + ASK_S
    while by_fd and (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select(list(by_fd), [], [], left)
        for fd in readable:
            pid = by_fd[fd]
            lines[pid] = lines.get(pid, b"") + _read_all(fd)
            if lines[pid].endswith(b"\n") or not lines[pid]:
                del by_fd[fd]
    return {pid: line for pid, line in lines.items() if line.startswith(COLLECTIVE.encode())}


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        except OSError:  # reset: a worker killed before it read our question; it is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
