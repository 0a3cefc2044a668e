"""What the controller thread gathers of a run in flight: ``RunState``, ``Inquiry``.

::

    agents ─► controller thread ─► RunState: results, failures, the autopsy, phases, who cleared
                                     └─► RunEvents (the run, runs.Run): output, debugger, ended

A ``RunState`` is written by the controller thread only; the user's thread reads it once
``done`` is set. What the run does with its output, its debugger sessions and its end is the
run's own business (``RunEvents``, implemented by ``torchrunx.runs.Run``).
"""

from __future__ import annotations

__all__ = ["Inquiry", "RunEvents", "RunState"]

import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import zmq

from .links import AgentHandle
from .outcome import Evidence, Failure, Preemption
from .transport.messages import Phase, Phases, RankStatus, Stacks

if TYPE_CHECKING:
    from .logs import Chunk
    from .transport.messages import Debug, DirectResult, Status


class RunEvents(Protocol):
    """What a run hears from the controller thread (called on that thread: return quickly)."""

    def output(self, chunk: Chunk) -> None:
        """Output of one of the run's workers."""

    def debug(self, agent: AgentHandle, message: Debug) -> None:
        """A rank's debugger session said something."""

    def ended(self) -> None:
        """No process of the run is left on any host: ``RunState.done`` is set."""


@dataclass
class Inquiry:
    """Stacks or statuses asked of a run in flight: complete once every agent has answered."""

    waiting: set[int]  # indexes into the run's agents
    stacks: dict[int, str] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)
    statuses: dict[int, RankStatus] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def answered(self, index: int) -> None:
        """Agent ``index`` has answered (or cannot)."""
        self.waiting.discard(index)
        if not self.waiting:
            self.done.set()


@dataclass
class RunState:
    """One run: what was asked, what came back."""

    id: str
    agents: list[AgentHandle]
    workers_per_host: list[int]
    result_token: str  # proves a worker's direct result belongs to this run
    events: RunEvents
    results: dict[int, list[zmq.Frame]] = field(default_factory=dict)  # pickles, by rank
    failures: list[Failure] = field(default_factory=list)
    evidence: Evidence = field(default_factory=Evidence)  # the autopsy's stacks, among others
    inquiries: dict[str, Inquiry] = field(default_factory=dict)  # asked for, by request id
    uncleared: set[int] = field(default_factory=set)  # indexes into agents
    done: threading.Event = field(default_factory=threading.Event)
    phases: list[Phase] = field(default_factory=list)  # for its trace, if it is traced
    received: dict[int, float] = field(default_factory=dict)  # when each rank's outcome came
    preemption: Preemption | None = None  # the launcher's notice, if it came before the end

    def agent_index(self, agent: AgentHandle) -> int | None:
        """Position of ``agent`` in this run, or None."""
        for i, a in enumerate(self.agents):
            if a is agent:
                return i
        return None

    def take_direct(self, message: DirectResult, frames: list[zmq.Frame]) -> bool:
        """A worker's large result, sent straight to the launcher: taken if it is the run's.

        Only with the run's token, and only once per rank: anything else is dropped unread.
        """
        if (
            not hmac.compare_digest(message.token, self.result_token)
            or not 0 <= message.rank < sum(self.workers_per_host)
            or message.rank in self.results
        ):
            return False
        self.results[message.rank] = frames
        self.received[message.rank] = time.time()
        return True

    def record(self, agent: AgentHandle, message: Phases | Stacks | Status) -> None:
        """What an agent reports of the run that changes nothing but this record."""
        if isinstance(message, Phases):
            self.phases += message.phases
        elif isinstance(message, Stacks):
            self._on_stacks(agent, message)
        else:
            self._on_status(agent, message)

    def _on_stacks(self, agent: AgentHandle, message: Stacks) -> None:
        """An agent's stacks: the autopsy, or the answer to an inquiry."""
        stacks = {s.rank: s.text for s in message.ranks}
        if message.request is None:  # the autopsy, before the run's processes were killed
            self.evidence.stacks.update(stacks)
            self.evidence.silent.update(message.silent)
            return
        asked = self.inquiries.get(message.request)
        i = self.agent_index(agent)
        if asked is not None and i is not None:
            asked.stacks.update(stacks)
            asked.silent.update(message.silent)
            asked.answered(i)

    def _on_status(self, agent: AgentHandle, message: Status) -> None:
        """An agent's answer to a status inquiry."""
        asked = self.inquiries.get(message.request)
        i = self.agent_index(agent)
        if asked is not None and i is not None:
            asked.statuses.update((r.rank, r) for r in message.ranks)
            asked.answered(i)

    def cleared(self, index: int) -> bool:
        """Agent ``index`` has nothing of the run left; whether that was the last one."""
        for asked in self.inquiries.values():
            asked.answered(index)  # nothing more will come from there for this run
        self.uncleared.discard(index)
        return not self.uncleared
