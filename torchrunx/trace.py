"""A run's timeline as a trace file (Chrome / Perfetto trace-event JSON), with ``TORCHRUNX_TRACE``.

``TORCHRUNX_TRACE=folder``: each run writes ``folder/<run id>.json``. Open it in
https://ui.perfetto.dev or ``chrome://tracing``: one process per host, one thread per rank, and
their phases (the agent's fork, the worker's start, rendezvous, process group, the function,
pickling, the way to the launcher, teardown) on one time axis. Each host times its own phases
with its own clock: across hosts, phases line up as well as their clocks do.
"""

from __future__ import annotations

__all__ = ["TRACE_ENV", "write"]

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .transport.messages import Phase

TRACE_ENV = "TORCHRUNX_TRACE"
"""The environment variable naming the folder of the trace files (unset: no trace)."""


def folder() -> Path | None:
    """Where traces go, if anywhere."""
    value = os.environ.get(TRACE_ENV, "")
    return Path(value) if value else None


def write(  # noqa: PLR0913 -- one per part of the picture
    run_id: str,
    *,
    hostnames: list[str],
    workers_per_host: list[int],
    phases: Iterable[Phase],
    received: dict[int, float],
    span: tuple[float, float],
    agents: list[tuple[float, float]],
    attempt: int = 0,
    path: str = "fresh",
) -> Path | None:
    """Write the run's trace; its path (None without ``TORCHRUNX_TRACE``, or if it failed).

    ``agents``: each host's agent start (spawned, said hello), if it started for this run.
    ``attempt``: restarts before this one (``<run id>.attemptN.json`` after the first).
    ``path``: how its workers came: ``"fresh"`` (forked for it) or ``"standby"`` (ready before).
    """
    where = folder()
    if where is None:
        return None
    timeline = _Timeline(span[0])
    host_of = [g for g, n in enumerate(workers_per_host) for _ in range(n)]
    _hosts(timeline, hostnames, agents, host_of)
    launcher = len(hostnames)
    title = f"launcher, attempt {attempt + 1}" if attempt else "launcher"
    timeline.name("process_name", launcher, None, title)
    timeline.span("run", (launcher, 0), span)
    last_end: dict[int, float] = {}
    for p in phases:
        if 0 <= p.rank < len(host_of):
            timeline.span(p.name, (host_of[p.rank], p.rank), (p.start, p.end))
            if p.name in ("function", "pickle"):
                last_end[p.rank] = max(last_end.get(p.rank, 0.0), p.end)
    for rank, at in received.items():
        if rank in last_end:
            timeline.span("to the launcher", (host_of[rank], rank), (last_end[rank], at))
    events = timeline.events
    try:
        where.mkdir(parents=True, exist_ok=True)
        name = f"{run_id}.json" if not attempt else f"{run_id}.attempt{attempt + 1}.json"
        content = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"path": path}}
        (where / name).write_text(json.dumps(content))
    except OSError:
        return None
    return where / name


def _hosts(
    timeline: _Timeline,
    hostnames: list[str],
    agents: list[tuple[float, float]],
    host_of: list[int],
) -> None:
    """A process per host, a thread per rank (and one for its agent, if it started now)."""
    for g, host in enumerate(hostnames):
        timeline.name("process_name", g, None, host)
        if g < len(agents) and agents[g][1] >= agents[g][0] > 0:
            timeline.name("thread_name", g, -1, "agent")
            timeline.span("agent start", (g, -1), agents[g])
    for r, g in enumerate(host_of):
        timeline.name("thread_name", g, r, f"rank {r}")


class _Timeline:
    """Trace events, in microseconds from ``zero`` (the run's submission)."""

    def __init__(self, zero: float) -> None:
        self.zero = zero
        self.events: list[dict[str, Any]] = []

    def name(self, kind: str, pid: int, tid: int | None, name: str) -> None:
        """Name a process (a host) or a thread (a rank)."""
        event: dict[str, Any] = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
        if tid is not None:
            event["tid"] = tid
        self.events.append(event)

    def span(self, name: str, where: tuple[int, int], when: tuple[float, float]) -> None:
        """A complete event ("X") on host ``where[0]``, rank ``where[1]``."""
        begin, end = when
        self.events.append(
            {
                "ph": "X",
                "cat": "torchrunx",
                "name": name,
                "pid": where[0],
                "tid": where[1],
                "ts": round((begin - self.zero) * 1e6, 1),
                "dur": round(max(end - begin, 0.0) * 1e6, 1),
            }
        )
