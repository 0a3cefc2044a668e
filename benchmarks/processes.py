"""What a standalone benchmark's driver starts, and leaves: orphans reaped, leftovers killed.

Standard library at import (psutil only when leftovers are looked for).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def set_child_subreaper() -> None:
    """Orphans of what this process starts (agents, workers) become its children: found, reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap() -> None:
    """Reap the orphans that exited (their parent, the subreaper, is this process)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def leftovers(grace: float) -> list[str]:
    """This process's descendants still running after ``grace`` s: reported, killed, reaped."""
    import psutil  # noqa: PLC0415 -- the driver's only

    def alive() -> list[psutil.Process]:
        found = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    deadline = time.monotonic() + grace
    left = alive()
    while left and time.monotonic() < deadline:
        reap()
        time.sleep(0.05)
        left = alive()
    names = []
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    time.sleep(0.1)
    reap()
    return names


@contextlib.contextmanager
def driving(prefix: str, *, keep: bool, grace: float) -> Iterator[Path]:
    """A driver's whole measurement: a scratch folder, and nothing of it left afterwards.

    SIGTERM unwinds as an exception would; orphans of what it starts are this process's to
    reap; at the end what still runs after ``grace`` s is reported and killed, and the folder
    goes (unless ``keep``).
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    set_child_subreaper()
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield scratch
    finally:
        left = leftovers(grace)
        if left:
            print(f"left running at the end (killed): {left}", file=sys.stderr)
        if keep:
            print(f"scratch folder kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
