"""Stack dumps of live workers: asked from outside their Python, read back, and summarised.

::

    agent ── STACK_SIGNAL ──► worker: faulthandler (C) writes every thread's stack to fd 3
      ▲                                                         │
      └──────────────── the worker's stack pipe ◄───────────────┘

The signal handler is faulthandler's, written in C: a worker answers even when its main thread is
blocked in C (a collective, a ``time.sleep``), holding the GIL or not. A worker that is stopped
or stuck in the kernel does not answer; :func:`collect` names it silent at its deadline, and
never waits longer.

On the launcher's side, :func:`report` groups ranks whose innermost frames are the same and puts
the odd ones out first::

    rank 1: stuck_in_user_code (train.py:17) <- train (train.py:25)
    ranks 0, 2-7: barrier (torch/distributed/distributed_c10d.py:4857) <- train (train.py:30)
"""

from __future__ import annotations

__all__ = [
    "STACK_FD",
    "STACK_SIGNAL",
    "STARTING",
    "collect",
    "enable_dumps",
    "innermost",
    "read_now",
    "report",
]

import contextlib
import faulthandler
import os
import re
import select
import signal
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

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


def enable_dumps() -> None:
    """In a worker: dump every thread's stack to :data:`STACK_FD` on :data:`STACK_SIGNAL`.

    And as it dies of a fatal signal (a segfault, an abort such as NCCL's watchdog's): the
    agent reads that last dump when the worker is gone, so a death says where it happened.
    """
    faulthandler.register(STACK_SIGNAL, file=STACK_FD, all_threads=True, chain=False)
    faulthandler.enable(file=STACK_FD, all_threads=True)


def read_now(fd: int) -> str:
    """What a stack pipe holds now (a dead worker's last dump), without waiting."""
    return _read_all(fd).decode(errors="replace")


def collect(
    pipes: Mapping[int, int], deadline: float = DEADLINE_S
) -> tuple[dict[int, str], set[int]]:
    """Signal each process of ``pipes`` (pid -> its stack pipe's read end) and read its dump.

    Returns the dumps by pid, and the pids that wrote nothing within ``deadline`` seconds (a
    process that exits meanwhile is in neither).
    Bounded: at most ``deadline`` plus one quiet period.
    """
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
    return {pid: d.decode(errors="replace") for pid, d in dumps.items() if d}, silent


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# ---- reading dumps


@dataclass(frozen=True)
class Frame:
    """One line of a dump: ``File "path", line N in function``."""

    path: str
    line: int
    function: str

    def where(self) -> str:
        """``function (file:line)``, the file shortened where it is a library's."""
        return f"{self.function} ({_short(self.path)}:{self.line})"


_FRAME = re.compile(r'^\s+File "(?P<path>.*)", line (?P<line>\d+) in (?P<function>.*)$')
_HERE = str(Path(__file__).parent)
_LIBRARIES = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def threads(dump: str) -> list[list[Frame]]:
    """Each thread's frames in ``dump``, innermost first (as faulthandler writes them)."""
    found: list[list[Frame]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread ", "Current thread ", "Stack ")):
            found.append([])
        elif found and (m := _FRAME.match(line)):
            found[-1].append(Frame(m["path"], int(m["line"]), m["function"]))
    return found


def main_thread(dump: str) -> list[Frame]:
    """The frames of the thread that runs the user's function (it started in our worker)."""
    every = threads(dump)
    for frames in every:
        if any(f.path.startswith(_HERE) and f.function == "run_worker" for f in frames):
            return [f for f in frames if not f.path.startswith(_HERE)]
    return every[0] if every else []


def _is_users(frame: Frame) -> bool:
    return not frame.path.startswith((_HERE, *_LIBRARIES)) and not frame.path.startswith("<frozen")


def innermost(dump: str) -> str:
    """Where the rank is: its innermost frame and, if that is a library's, the user's frame."""
    if dump.startswith("("):  # a state, not a dump
        return dump
    frames = main_thread(dump)
    if not frames:
        return "no Python frame"
    first = frames[0]
    mine = next((f for f in frames if _is_users(f)), None)
    if mine is None or mine is first:
        callers = [f for f in frames[1:] if _is_users(f)]
        return first.where() + (f" <- {callers[0].where()}" if callers else "")
    return f"{first.where()} <- {mine.where()}"


def report(stacks: Mapping[int, str], silent: Iterable[int] = (), died: Iterable[int] = ()) -> str:
    """One line per group of ranks at the same place, the smallest groups (odd ones out) first.

    Ranks in ``died`` are where they were as they died (a fatal signal's dump).
    """
    dead = set(died)
    groups: dict[str, list[int]] = {}
    for rank, dump in stacks.items():
        where = innermost(dump) + (" (as it died)" if rank in dead else "")
        groups.setdefault(where, []).append(rank)
    lines = [
        f"{_ranks(ranks)}: {where}"
        for where, ranks in sorted(groups.items(), key=lambda g: (len(g[1]), min(g[1])))
    ]
    quiet = sorted(silent)
    if quiet:
        lines.append(
            f"{_ranks(quiet)}: did not answer within {DEADLINE_S:g} s "
            "(stopped, or stuck in the kernel)"
        )
    return "\n".join(lines)


def _ranks(ranks: Iterable[int]) -> str:
    """``rank 3``, ``ranks 0, 2-7``."""
    ordered = sorted(set(ranks))
    spans: list[str] = []
    start = prev = ordered[0]
    for r in [*ordered[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ordered) == 1 else "ranks ") + ", ".join(spans)


def _short(path: str) -> str:
    for root in sorted(_LIBRARIES, key=len, reverse=True):
        if path.startswith(root + os.sep):
            return path[len(root) + 1 :]
    with contextlib.suppress(ValueError):  # another drive, or no working directory
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative
    return path
