"""Stack dumps of live workers: asked from outside their Python, read back, and summarised.

::

    agent ── STACK_SIGNAL ──► worker: faulthandler (C) writes every thread's stack to fd 3
      ▲                                                         │
      └──────────────── the worker's stack pipe ◄───────────────┘

The signal handler is faulthandler's, written in C: a worker answers even when its main thread is
blocked in C (a collective, a ``time.sleep``), holding the GIL or not. A worker that is stopped
or stuck in the kernel does not answer; :func:`collect` names it silent at its deadline, and
never waits longer.

The stack channel is a socket pair, so it also carries a question the other way: once the dumps
are in, a worker of a run with a process group is asked for its last collective (a byte), and a
thread of the worker answers with one line from torch's flight recorder (:func:`answer_asks`).
That thread needs the GIL, which collectives release; a rank that holds it keeps its line.

On the launcher's side, :func:`report` groups ranks whose innermost frames are the same and puts
the odd ones out first::

    rank 1: stuck_in_user_code (train.py:17) <- train (train.py:25) · last collective #4 \
nccl:all_reduce, completed
    ranks 0, 2-7: barrier (torch/distributed/distributed_c10d.py:4857) <- train (train.py:30) \
· last collective #5 nccl:all_reduce, not completed
"""

from __future__ import annotations

__all__ = [
    "STACK_FD",
    "STACK_SIGNAL",
    "STARTING",
    "answer_asks",
    "collect",
    "enable_dumps",
    "in_launchers_terms",
    "innermost",
    "is_installed",
    "is_ours",
    "read_now",
    "report",
]

import contextlib
import faulthandler
import os
import pickle
import re
import select
import signal
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
ASK_S = 0.25
"""How long the workers get to say which collective they are in, once their dumps are in."""
COLLECTIVE = "torchrunx: "
"""Starts the line a worker adds to its dump: the last collective it entered."""


def enable_dumps() -> None:
    """In a worker: dump every thread's stack to :data:`STACK_FD` on :data:`STACK_SIGNAL`.

    And as it dies of a fatal signal (a segfault, an abort such as NCCL's watchdog's): the
    agent reads that last dump when the worker is gone, so a death says where it happened.
    """
    faulthandler.register(STACK_SIGNAL, file=STACK_FD, all_threads=True, chain=False)
    faulthandler.enable(file=STACK_FD, all_threads=True)


def answer_asks() -> None:
    """In a worker with a process group: answer each byte on :data:`STACK_FD` with a line.

    The line (:data:`COLLECTIVE`) names the last collective the worker entered, read from
    torch's flight recorder when the agent asks, so it costs nothing until then.
    """
    threading.Thread(target=_answer, name="torchrunx-collectives", daemon=True).start()


def _answer() -> None:
    while True:
        select.select([STACK_FD], [], [])
        try:
            if not os.read(STACK_FD, 64):
                return
        except BlockingIOError:
            continue
        except OSError:  # the channel is gone: nobody will ask again
            return
        try:
            line = COLLECTIVE + last_collective()
        except Exception as e:  # noqa: BLE001 -- a report, not a reason to stop answering
            line = f"{COLLECTIVE}last collective unknown ({type(e).__name__}: {e})"
        with contextlib.suppress(OSError):
            os.write(STACK_FD, (line.replace("\n", " ") + "\n").encode())


def last_collective() -> str:
    """The collective this process entered last, by sequence number and kind, and its state.

    ``last collective #5 nccl:all_reduce, not completed``, from torch's flight recorder; only the
    sequence number where the recorder keeps no entries; ``no collective yet`` before the first.
    """
    import torch.distributed as dist  # noqa: PLC0415 -- only in workers, where it is loaded

    if not dist.is_initialized():
        return "no process group yet"
    from torch._C import _distributed_c10d as c10d  # noqa: PLC0415

    # torch keeps one recorder for NCCL and one for the other backends (older: NCCL's only)
    dumps = [getattr(c10d, name, None) for name in ("_dump_nccl_trace", "_dump_fr_trace")]
    status: dict[str, dict[str, int]] = {}
    entries: list[dict[str, Any]] = []
    for dump in filter(None, dumps):
        try:
            raw = dump(includeCollectives=True, includeStackTraces=False, onlyActive=False)
        except RuntimeError:  # a recorder this process does not use
            continue
        trace = pickle.loads(raw)  # noqa: S301 -- torch's own bytes, from this process
        for group, counters in trace.get("pg_status", {}).items():
            mine = status.setdefault(str(group), {})
            for name, value in counters.items():
                mine[name] = max(mine.get(name, -1), value)
        entries += [e for e in trace.get("entries", []) if e.get("collective_seq_id")]
    if not any(dumps):
        return "last collective unknown (this torch has no flight recorder)"
    if not entries:
        seqs = [s.get("last_enqueued_collective", -1) for s in status.values()]
        return f"last collective #{max(seqs)}" if seqs and max(seqs) > 0 else "no collective yet"
    last = max(entries, key=lambda e: (e.get("time_created_ns", 0), e.get("record_id", 0)))
    seq, group = last["collective_seq_id"], last.get("process_group", ("0", "default_pg"))
    done = status.get(str(last.get("pg_id", group[0])), {}).get("last_completed_collective", -1)
    where = "" if group[1] == "default_pg" else f" in group {group[1]}"
    state = "completed" if done >= seq or last.get("state") == "completed" else "not completed"
    return f"last collective #{seq} {last.get('profiling_name', '?')}{where}, {state}"


def read_now(fd: int) -> str:
    """What a stack pipe holds now (a dead worker's last dump), without waiting."""
    return _read_all(fd).decode(errors="replace")


def collect(
    pipes: Mapping[int, int], deadline: float = DEADLINE_S, *, ask: bool = False
) -> tuple[dict[int, str], set[int]]:
    """Signal each process of ``pipes`` (pid -> its stack channel's end) and read its dump.

    Returns the dumps by pid, and the pids that wrote nothing within ``deadline`` seconds (a
    process that exits meanwhile is in neither). With ``ask``, each dump ends with the line its
    worker gives about its last collective (see :func:`answer_asks`), where it gives one.
    Bounded: at most ``deadline`` plus one quiet period, plus :data:`ASK_S` with ``ask``.
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
    """Each worker's line about its last collective: those that give one within :data:`ASK_S`."""
    by_fd: dict[int, int] = {}
    for pid, fd in channels.items():
        with contextlib.suppress(OSError):  # gone, or a channel that is full: no answer
            os.write(fd, b"?")
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


def in_launchers_terms(text: str, copy: str, copied_from: str) -> str:
    """A traceback or stack dump, with the files of a host's copy of ``sync_dir`` renamed.

    They are named as the launcher has them (``copied_from``, instead of ``copy``): the same
    contents, and the files the user edits and opens.
    """
    if not copy:
        return text
    return text.replace(f'File "{copy}/', f'File "{copied_from}/')


def is_ours(path: str) -> bool:
    """A file of this package, or of how Python starts a module (``<frozen runpy>``)."""
    return path.startswith((_HERE + os.sep, "<frozen runpy"))


def is_installed(path: str) -> bool:
    """A file of the standard library or of an installed package (this one's too)."""
    return path.startswith(_LIBRARIES)


def _is_users(frame: Frame) -> bool:
    return not frame.path.startswith((_HERE, *_LIBRARIES)) and not frame.path.startswith("<frozen")


def innermost(dump: str) -> str:
    """Where the rank is: its innermost frame and, if that is a library's, the user's frame.

    And the last collective it entered, where its dump says.
    """
    if dump.startswith("("):  # a state, not a dump
        return dump
    collective = next(
        (line[len(COLLECTIVE) :] for line in dump.splitlines() if line.startswith(COLLECTIVE)),
        None,
    )
    place = _place(dump)
    return place if collective is None else f"{place} · {collective}"


def _place(dump: str) -> str:
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
