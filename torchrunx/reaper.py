"""Process-lifetime tools: parent-death signals, child subreapers and process-tree killing.

Killing is escalation with a deadline: the caller sends a signal to every process of a set, and
polls (it never blocks) until they are gone. Zombies count as gone: their parent reaps them.
"""

from __future__ import annotations

__all__ = [
    "alive",
    "set_child_subreaper",
    "set_parent_death_signal",
    "signal_all",
]

import contextlib
import ctypes
import ctypes.util
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

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
