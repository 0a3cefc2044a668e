"""Ending processes: parent-death signals, child subreapers, and teardown within a deadline.

This module owns "end these processes and everything they started, within this deadline"; every
kill in the package goes through it, and every wait after one is bounded:

- ``Teardown`` signals a set of pids, gives it a grace period, escalates to SIGKILL and
  gives up at a deadline, either polled from an event loop (a run's leftovers) or waited for (an
  agent's own shutdown). ``run_processes()`` finds what a run's workers started.
- ``end()`` does the same for child processes we hold a handle of (``subprocess.Popen``, an
  agent behind SSH): agents told to leave by their cut lifeline, forkservers killed at once.
- ``kill_now()`` and ``kill_groups()`` are the immediate kills of a cancelled run.

A process is gone only once it has been reaped: an exiting process or a zombie may still hold
memory (a GPU's among it), so a teardown waits for those too (the forkserver, their subreaper,
reaps them at once).
"""

from __future__ import annotations

__all__ = [
    "Child",
    "Teardown",
    "alive",
    "end",
    "existing",
    "kill_groups",
    "kill_now",
    "remove_private_folder",
    "run_processes",
    "set_child_subreaper",
    "set_parent_death_signal",
    "signal_all",
]

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

GRACE_S = 3.0
"""How long a process gets between SIGTERM and SIGKILL."""
DEADLINE_S = 10.0
"""Longest wait for killed processes to vanish; past it they are reported and given up on."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def set_child_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it (and reaped by it)."""
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each process, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_now(pids: Iterable[int]) -> None:
    """SIGKILL each process at once (a cancelled run's), ignoring those already gone."""
    signal_all(pids, signal.SIGKILL)


def kill_groups(leaders: Iterable[int]) -> None:
    """SIGKILL the process group of each leader: a worker and what it started in its session."""
    for pid in leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class Child(Protocol):
    """A process we hold a handle of: ``subprocess.Popen``, or an agent behind an SSH channel."""

    def poll(self) -> int | None:
        """Its exit status once it has exited (and been reaped), else None."""

    def kill(self) -> None:
        """End it now (SIGKILL; for an agent over SSH, drop its connection)."""


def end(
    children: Sequence[Child], grace: float = GRACE_S, deadline: float = DEADLINE_S
) -> list[Child]:
    """Let ``children`` exit on their own for ``grace`` s, kill the rest, wait up to ``deadline``.

    They were told to leave beforehand (an agent's lifeline cut); ``grace=0`` kills at once. All
    are waited for together, so closing many costs one grace, not one each. Never raises, never
    waits past ``deadline``: returns those still there (a process stuck in the kernel).
    """
    started = time.monotonic()
    pending = [c for c in children if c.poll() is None]
    killed = False
    while pending:
        waited = time.monotonic() - started
        if not killed and waited >= grace:
            killed = True
            for child in pending:
                with contextlib.suppress(OSError):  # gone meanwhile
                    child.kill()
        if waited >= deadline:
            break
        time.sleep(0.005)
        pending = [c for c in pending if c.poll() is None]
    return pending


def remove_private_folder(folder: str) -> None:
    """Remove what a dead agent left behind: its private folder (``torchrunx-agent-*``)."""
    if Path(folder).name.startswith("torchrunx-agent-"):
        shutil.rmtree(folder, ignore_errors=True)


_PF_EXITING = 0x4  # include/linux/sched.h: the process is in do_exit()


def alive(pids: Iterable[int]) -> list[int]:
    """The processes among ``pids`` that still run: not zombies, and not already exiting.

    An exiting process (``PF_EXITING``) has closed its sockets, so its peers may already have
    failed because of it, yet it is not a zombie yet: it counts as dead here.
    """
    running = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()  # after the command name, which may hold spaces
        if fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING:
            running.append(pid)
    return running


def existing(pids: Iterable[int]) -> list[int]:
    """The processes among ``pids`` that exist in any state: running, exiting, zombie."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


class Teardown:
    """Ends ``pids``: ``first`` now, SIGKILL after ``grace`` s, given up on after ``deadline`` s.

    Poll ``done()`` from an event loop, or block in ``wait()``. ``reaped``: wait until the
    processes are reaped (by a subreaper of ours); else only until they are dead (processes that
    were orphaned to an init that may never reap them).
    """

    def __init__(
        self,
        pids: Iterable[int],
        first: int = signal.SIGTERM,
        grace: float = GRACE_S,
        deadline: float = DEADLINE_S,
        *,
        reaped: bool = True,
    ) -> None:
        self.remaining = list(pids)
        self.left = existing if reaped else alive
        self.started = time.monotonic()
        self.grace = grace
        self.deadline = deadline
        self.killed = first == signal.SIGKILL
        signal_all(self.remaining, first)

    def done(self) -> bool:
        """Whether every process is gone, or the deadline passed (``remaining`` lists the rest).

        Gone: reaped, not only dead (see the module's docstring).
        """
        self.remaining = self.left(self.remaining)
        waited = time.monotonic() - self.started
        if self.remaining and not self.killed and waited >= self.grace:
            self.killed = True
            signal_all(alive(self.remaining), signal.SIGKILL)
        return not self.remaining or waited >= self.deadline

    def wait(self, interval: float = 0.01) -> list[int]:
        """Block until ``done()``; the processes that outlived the deadline."""
        while not self.done():
            time.sleep(interval)
        return self.remaining


def run_processes(  # noqa: PLR0913 -- one per way a process is known to be the run's
    root: int,
    workers: set[int],
    other_workers: set[int],
    pipes: set[int],
    run_id: str,
    *,
    alone: bool,
) -> list[int]:
    """The live descendants of ``root`` that a run's ``workers`` left behind (not the workers).

    Everything a worker starts ends up under ``root`` (the forkserver, a subreaper). Processes of
    ``other_workers`` (other runs' workers) and their descendants are never taken. When the run
    is ``alone`` on the host, every other process there is its own; else a process is the run's if
    it descends from one of its workers, shares a worker's session, holds one of its output
    ``pipes`` (inodes: forked children inherit them) or carries its ``run_id`` in
    ``$TORCHRUNX_RUN_ID`` (exec'd children do).
    """
    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    foreign = set(other_workers)
    for pid in other_workers:
        with contextlib.suppress(psutil.Error):
            foreign |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    candidates = [p for p in descendants if p.pid not in foreign and p.pid not in workers]
    if alone:
        return [p.pid for p in candidates]
    links = {f"pipe:[{inode}]" for inode in pipes}
    return [p.pid for p in candidates if _belongs(p, workers, links, run_id)]


def _belongs(p: psutil.Process, workers: set[int], links: set[str], run_id: str) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return (
            os.getsid(p.pid) in workers
            or any(a.pid in workers for a in p.parents())
            or _holds_any(p.pid, links)
            or p.environ().get("TORCHRUNX_RUN_ID") == run_id
        )
    return False


def _holds_any(pid: int, links: set[str]) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if str(fd.readlink()) in links:
                return True
    return False
