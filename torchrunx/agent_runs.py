"""What the agent knows of each run on its host, and of each of the run's worker processes.

::

    HostRun ──workers (by local rank)──► WorkerProcess ──output──► WorkerOutput (agent_output)
      │ rendezvous, connected ranks        pid, stack channel, exit, outcome
      └ its spec, its forkserver, the teardown of what its workers left

The agent's loop, its output pump and its diagnosis all read these; only the agent changes a
run's or a worker's state (the pump changes a worker's output only).
"""

from __future__ import annotations

__all__ = ["HostRun", "WorkerProcess"]

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from .agent_output import WorkerOutput
from .reaper import Teardown
from .transport.messages import Phase, RankState, Rendezvous, RunSpec, WorkerSlot


@dataclass
class WorkerProcess:
    """One worker of a run on this host: from before its fork until it has exited."""

    run: HostRun
    slot: WorkerSlot
    output: WorkerOutput
    stack_fd: int = -1  # read end of its stack pipe (see stacks.py)
    pid: int | None = None
    exited: bool = False
    died_before_cancel: bool = False
    outcome: RankState | None = None  # "returned" or "failed", once it has reached us
    forked_wall: float = 0.0  # seconds since 1970 (its age; the run's trace)
    exited_wall: float = 0.0
    process: psutil.Process | None = None  # for its memory and CPU (kept: CPU % is a delta)

    @property
    def has_outcome(self) -> bool:
        """Its result or error has reached us."""
        return bool(self.outcome)

    def close_stack_pipe(self) -> None:
        """Its stack channel is of no more use: it has exited, or the agent is closing."""
        if self.stack_fd >= 0:
            os.close(self.stack_fd)
            self.stack_fd = -1


@dataclass
class HostRun:
    """One run on this host: its workers here, until none of their processes is left."""

    id: str
    workers: dict[int, WorkerProcess]  # by local rank
    rendezvous: Rendezvous | None = None
    connected: set[int] = field(default_factory=set)
    cancelled: bool = False
    teardown: Teardown | None = None  # of what the workers left, once they have all exited
    spec: RunSpec | None = None  # as its workers have it (the env completed here)
    key: str = ""  # its setup (see agent_forkservers.setup_key)
    fork_sent: float = 0.0  # seconds since 1970, for its trace
    forkserver_pid: int = 0  # the parent of its workers
    go: list[Any] | None = None  # a standby run's function, once it came: for each worker

    def phases(self) -> tuple[Phase, ...]:
        """Each worker's fork and teardown, as this agent saw them (for the run's trace)."""
        now = time.time()
        phases = []
        for w in self.workers.values():
            if w.forked_wall:
                phases.append(Phase(w.slot.rank, "fork", self.fork_sent, w.forked_wall))
            if w.exited_wall:
                phases.append(Phase(w.slot.rank, "teardown", w.exited_wall, now))
        return tuple(phases)
