"""Stack dumps of live workers, the worker's side: faulthandler's handler, the collective line.

::

    agent ── STACK_SIGNAL ──────► faulthandler (C): every thread's stack ──────────────► fd 3
    agent ── "?" on fd 3 ───────► listen's thread: "torchrunx: last collective ..." ──────► fd 3
    agent ── "!" on fd 3 ───────► listen's thread: the preemption notice (preempted() True)

``enable_dumps()`` installs faulthandler's handler, written in C: the worker answers even when
its main thread is blocked in C. ``listen()`` starts a thread that takes the notice and
answers each question with one line from torch's flight recorder (``last_collective()``).
What the agent does with them is in ``torchrunx.stacks``, which owns the signal and the
channel's fd.
"""

from __future__ import annotations

__all__ = ["enable_dumps", "last_collective", "listen", "record_collectives"]

import contextlib
import faulthandler
import os
import pickle
import select
import threading
from typing import Any

from . import preemption
from .stacks import ASK, COLLECTIVE, NOTICE, STACK_FD, STACK_SIGNAL


def enable_dumps() -> None:
    """In a worker: dump every thread's stack to ``STACK_FD`` on ``STACK_SIGNAL``.

    And as it dies of a fatal signal (a segfault, an abort such as NCCL's watchdog's): the
    agent reads that last dump when the worker is gone, so a death says where it happened.
    """
    faulthandler.register(STACK_SIGNAL, file=STACK_FD, all_threads=True, chain=False)
    faulthandler.enable(file=STACK_FD, all_threads=True)


def record_collectives() -> None:
    """Before the process group is made: torch's flight recorder keeps the last 2000 collectives.

    What ``last_collective()`` reads; the agent, which never imports torch, cannot tell which
    name this torch reads. A torch whose recorder serves every backend (it has
    ``_dump_fr_trace``) reads ``TORCH_FR_BUFFER_SIZE`` and warns that the older name is
    deprecated; an older one reads ``TORCH_NCCL_TRACE_BUFFER_SIZE`` alone. It is read once, as
    the first group is made. A size the user set under either name is kept (``0``: none kept).
    """
    from torch._C import _distributed_c10d as c10d  # noqa: PLC0415 -- only in workers

    new, old = "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"
    name = new if hasattr(c10d, "_dump_fr_trace") else old
    if name not in os.environ:
        os.environ[name] = os.environ.get(new) or os.environ.get(old) or "2000"


def listen() -> None:
    """In a worker: take the agent's bytes on ``STACK_FD``, in a thread of its own.

    ``NOTICE`` is the preemption notice (``torchrunx.preempted()`` turns True);
    ``ASK`` is answered with a line (``COLLECTIVE``) naming the last collective the
    worker entered, read from torch's flight recorder when the agent asks, so it costs nothing
    until then. A notice already waiting (a run started after it) is taken before this returns.
    """
    with contextlib.suppress(OSError):
        _take(os.read(STACK_FD, 64))  # before the worker connects, only a notice can be there
    threading.Thread(target=_listen, name="torchrunx-listen", daemon=True).start()


def _listen() -> None:
    while True:
        select.select([STACK_FD], [], [])
        try:
            data = os.read(STACK_FD, 64)
        except BlockingIOError:
            continue
        except OSError:  # the channel is gone: nobody will ask again
            return
        if not data:
            return
        _take(data)


def _take(data: bytes) -> None:
    if NOTICE in data:
        preemption.notice()
    if ASK in data:
        _answer()


def _answer() -> None:
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
    groups = False  # whether a recorder knows of this process's groups (it is on, and serves them)
    for raw in filter(None, map(_dump, filter(None, dumps))):
        trace = pickle.loads(raw)  # noqa: S301 -- torch's own bytes, from this process
        groups = groups or bool(trace.get("pg_config"))
        for group, counters in trace.get("pg_status", {}).items():
            mine = status.setdefault(str(group), {})
            for name, value in counters.items():
                mine[name] = max(mine.get(name, -1), value)
        # torch 2.3 numbers every operation in seq_id; 2.4 on, collectives apart from p2p
        entries += [
            {**e, "collective_seq_id": seq}
            for e in trace.get("entries", [])
            if (seq := e.get("collective_seq_id", e.get("seq_id")))
        ]
    if not any(dumps):
        return "last collective unknown (this torch has no flight recorder)"
    if not entries:
        return _by_counters(status, groups)
    last = max(entries, key=lambda e: (e.get("time_created_ns", 0), e.get("record_id", 0)))
    seq, group = last["collective_seq_id"], last.get("process_group", ("0", "default_pg"))
    done = status.get(str(last.get("pg_id", group[0])), {}).get("last_completed_collective", -1)
    where = "" if group[1] == "default_pg" else f" in group {group[1]}"
    state = "completed" if done >= seq or last.get("state") == "completed" else "not completed"
    return f"last collective #{seq} {last.get('profiling_name', '?')}{where}, {state}"


def _by_counters(status: dict[str, dict[str, int]], groups: bool) -> str:
    """The last collective where the recorder keeps no entries: its number, if it was counted.

    Without counters, only a recorder that knows of the groups can say there was none yet (one
    of NCCL's alone, say, knows nothing of gloo's).
    """
    seqs = [s.get("last_enqueued_collective", -1) for s in status.values()]
    if seqs and max(seqs) > 0:
        return f"last collective #{max(seqs)}"
    if not groups:
        return "last collective unknown (the flight recorder keeps no record of this process group)"
    return "no collective yet"


def _dump(dump: Any) -> bytes | None:
    """A recorder's pickled record, without stack traces where the torch lets us leave them out."""
    try:
        try:
            return bytes(dump(includeCollectives=True, includeStackTraces=False, onlyActive=False))
        except TypeError:  # torch 2.3: no switches, so all of it
            return bytes(dump())
    except RuntimeError:  # a recorder this process does not use
        return None
