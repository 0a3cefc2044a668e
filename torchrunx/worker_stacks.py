"""Stack dumps of live workers, the worker's side: faulthandler's handler, the collective line.

::

    agent ── STACK_SIGNAL ──────► faulthandler (C): every thread's stack ──────────────► fd 3
    agent ── "?" on fd 3 ───────► listen's thread: "torchrunx: last collective ..." ──────► fd 3
    agent ── "!" on fd 3 ───────► listen's thread: the preemption notice (preempted() True)

:func:`enable_dumps` installs faulthandler's handler, written in C: the worker answers even when
its main thread is blocked in C. :func:`listen` starts a thread that takes the notice and
answers each question with one line from torch's flight recorder (:func:`last_collective`).
What the agent does with them is in :mod:`torchrunx.stacks`, which owns the signal and the
channel's fd.
"""

from __future__ import annotations

__all__ = ["enable_dumps", "last_collective", "listen"]

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
    """In a worker: dump every thread's stack to :data:`STACK_FD` on :data:`STACK_SIGNAL`.

    And as it dies of a fatal signal (a segfault, an abort such as NCCL's watchdog's): the
    agent reads that last dump when the worker is gone, so a death says where it happened.
    """
    faulthandler.register(STACK_SIGNAL, file=STACK_FD, all_threads=True, chain=False)
    faulthandler.enable(file=STACK_FD, all_threads=True)


def listen() -> None:
    """In a worker: take the agent's bytes on :data:`STACK_FD`, in a thread of its own.

    :data:`NOTICE` is the preemption notice (``torchrunx.preempted()`` turns True);
    :data:`ASK` is answered with a line (:data:`COLLECTIVE`) naming the last collective the
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
