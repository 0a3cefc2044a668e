"""Stack dumps of live workers, the launcher's side: reading them, and the grouped report.

``report()`` groups ranks whose innermost frames are the same and puts the odd ones out
first::

    rank 1: stuck_in_user_code (train.py:17) <- train (train.py:25) · last collective #4 \
nccl:all_reduce, completed
    ranks 0, 2-7: barrier (torch/distributed/distributed_c10d.py:4857) <- train (train.py:30) \
· last collective #5 nccl:all_reduce, not completed

A dump is faulthandler's text, as the agent reads it (``torchrunx.stacks``), perhaps ended by
the worker's line about its last collective (``COLLECTIVE``).
"""

from __future__ import annotations

__all__ = ["RETURNED", "Frame", "innermost", "main_thread", "report", "threads"]

import contextlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .sources import LIBRARIES, PACKAGE, is_users
from .stacks import COLLECTIVE, DEADLINE_S

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

RETURNED = "returned"  # in place of a dump: the rank is known to have returned


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


def threads(dump: str) -> list[list[Frame]]:
    """Each thread's frames in ``dump``, innermost first (as faulthandler writes them)."""
    found: list[list[Frame]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread ", "Current thread ", "Stack ")):
            found.append([])
        elif found and (m := _FRAME.match(line)):
            found[-1].append(Frame(m["path"], int(m["line"]), m["function"]))
    return found


def main_thread(dump: str, *, ours: bool = False) -> list[Frame]:
    """The frames of the thread that runs the user's function (it started in our worker).

    Without ours (this package's), unless ``ours``.
    """
    every = threads(dump)
    for frames in every:
        if any(f.path.startswith(PACKAGE) and f.function == "run_worker" for f in frames):
            return frames if ours else [f for f in frames if not f.path.startswith(PACKAGE)]
    return every[0] if every else []


def innermost(dump: str) -> str:
    """Where the rank is: its innermost frame and, if that is a library's, the user's frame.

    And the last collective it entered, where its dump says.
    """
    if dump.startswith("(") or dump == RETURNED:  # a state, not a dump
        return dump
    collective = next(
        (line[len(COLLECTIVE) :] for line in dump.splitlines() if line.startswith(COLLECTIVE)),
        None,
    )
    place = _place(dump)
    return place if collective is None else f"{place} · {collective}"


def _place(dump: str) -> str:
    every = main_thread(dump, ours=True)
    frames = [f for f in every if not f.path.startswith(PACKAGE) and not _plumbing(f)]
    debugging = bool(every) and _in_debugger(every)
    if not any(is_users(f.path) for f in frames):
        state = _state_of({f.function for f in every if f.path.startswith(PACKAGE)})
        if state is not None:
            return state
    if not frames:
        return "no Python frame"
    mine = next((f for f in frames if is_users(f.path)), None)
    if debugging:
        return f"in the debugger at {(mine or frames[0]).where()}"
    first = frames[0]
    if mine is None or mine is first:
        callers = [f for f in frames[1:] if is_users(f.path)]
        return first.where() + (f" <- {callers[0].where()}" if callers else "")
    return f"{first.where()} <- {mine.where()}"


_PLUMBING = (
    "/zmq/",
    "<frozen abc>",
    "<frozen runpy>",
    "/concurrent/futures/",
    "/selectors.py",
    "/threading.py",
)
_DEBUGGER = ("/pdb.py", "/bdb.py", "/cmd.py")
_RETURNED = {"_send_result", "_leave", "_report_imports"}  # the worker's, after the function
_RAISED = {"_send_error", "_send_unpicklable"}
_STARTING = {"_rendezvous", "_init_process_group", "_set_up", "loads", "_split"}


def _plumbing(frame: Frame) -> bool:
    """A frame of the way messages or locks work (zmq, abc, futures), never a place to show."""
    return any(part in frame.path for part in _PLUMBING)


def _in_debugger(frames: list[Frame]) -> bool:
    """Whether the rank sits at a debugger prompt (pdb's frames above the user's)."""
    for f in frames:
        if is_users(f.path):
            return False
        if f.path.endswith(_DEBUGGER) or (f.path.startswith(PACKAGE) and "debugger" in f.path):
            return True
    return False


def _state_of(functions: set[str]) -> str | None:
    """Where a rank without a frame of the user's is, from its worker's own frames."""
    if functions & _RETURNED:
        return RETURNED
    if functions & _RAISED:
        return "raised"
    if functions & _STARTING:
        return "starting"
    return None


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
    for root in sorted(LIBRARIES, key=len, reverse=True):
        if path.startswith(root + os.sep):
            return path[len(root) + 1 :]
    with contextlib.suppress(ValueError):  # another drive, or no working directory
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative
    return path
