"""A run's outcome as what ``run()`` returns or raises: the one module that decides it.

The controller collects typed ``Failure`` values and the pickled results; ``resolve()``
runs in the thread that concludes the run's handle (never the controller's), since it unpickles.
"""

from __future__ import annotations

__all__ = [
    "SILENT",
    "AgentLost",
    "Evidence",
    "Failure",
    "Preemption",
    "QuitInDebugger",
    "ResultUnpicklable",
    "RunCancelled",
    "RunPreempted",
    "WorkerDied",
    "WorkerRaised",
    "add_note",
    "failure_exception",
    "resolve",
]

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stack_report
from .errors import (
    AgentFailedError,
    DebuggerQuitError,
    PreemptedError,
    RemoteTraceback,
    TorchrunxError,
    WorkerFailedError,
)
from .result import LaunchResult
from .transport import serialization
from .transport.messages import Debug, Died, Raised, Unpicklable

if TYPE_CHECKING:
    from collections.abc import Iterable


@dataclass(frozen=True)
class WorkerRaised:
    """The function raised; ``frames``: the exception, pickled (empty if it could not be)."""

    hostname: str
    error: Raised
    frames: list[Any]


@dataclass(frozen=True)
class ResultUnpicklable:
    """The function returned a value that cannot be pickled."""

    hostname: str
    error: Unpicklable


@dataclass(frozen=True)
class WorkerDied:
    """A worker ended without an outcome (a signal, ``os._exit``, ``sys.exit``)."""

    hostname: str
    death: Died


@dataclass(frozen=True)
class AgentLost:
    """A host's agent died, went silent or could not be reached; ``reason`` says which."""

    hostname: str
    reason: str


@dataclass(frozen=True)
class QuitInDebugger:
    """The user ended the run at a rank's debugger prompt; ``quit.text`` says how."""

    hostname: str
    quit: Debug


@dataclass(frozen=True)
class RunCancelled:
    """The run was cancelled: ``cancel()``, Ctrl-C, ``close()``."""

    reason: str


@dataclass(frozen=True)
class RunPreempted:
    """The grace after a preemption notice ended (its time ran out, or a second signal came)."""

    reason: str


Failure = (
    WorkerRaised
    | ResultUnpicklable
    | WorkerDied
    | AgentLost
    | QuitInDebugger
    | RunCancelled
    | RunPreempted
)


@dataclass
class Preemption:
    """A launcher's preemption notice: which signal reached which host, and the grace."""

    grace: float  # seconds the ranks have to return, from the first signal
    signals: dict[str, list[str]] = field(default_factory=dict)  # by host ("launcher": ours)
    deadline: float = 0.0  # monotonic: the grace ends then (or at a second signal)

    def describe(self) -> str:
        """``SIGTERM on node1, node2; SIGUSR1 on the launcher``."""
        by_signal: dict[str, list[str]] = {}
        for host, names in self.signals.items():
            for name in dict.fromkeys(names):
                by_signal.setdefault(name, []).append(host)
        return "; ".join(f"{s} on {', '.join(hosts)}" for s, hosts in by_signal.items())


_LIKELY_CAUSES = {
    "SIGKILL": "killed from outside, often by the kernel's out-of-memory killer",
    "SIGSEGV": "a segmentation fault, usually in a C/C++/CUDA extension",
    "SIGABRT": "aborted, e.g. by a failed assertion in native code",
    "SIGBUS": "a bus error, e.g. /dev/shm too small for shared memory",
}


SILENT = "(did not answer: stopped, or stuck in the kernel)"
"""The stack of a rank that did not answer."""


@dataclass
class Evidence:
    """What explains a failed run: where every live rank was (the autopsy) and the log files.

    Filled by the controller thread while the run ends; read once it has.
    """

    stacks: dict[int, str] = field(default_factory=dict)  # by rank: faulthandler's dump
    silent: set[int] = field(default_factory=set)  # ranks that did not answer
    died: set[int] = field(default_factory=set)  # ranks whose dump is from their death
    log_folder: Path | None = None

    def all_stacks(self) -> dict[int, str]:
        """Every rank's dump; ``SILENT`` for those that did not answer."""
        return dict(sorted({**self.stacks, **dict.fromkeys(self.silent, SILENT)}.items()))

    def report(self, raised: Iterable[int] = (), returned: Iterable[int] = ()) -> str:
        """Where the ranks were, grouped, odd ones out first; empty if none was running.

        A rank known to have ``raised`` is left out (its own traceback says where), one that
        ``returned`` says so: a dump taken as either happened shows the worker's plumbing.
        """
        gone = set(raised)
        stacks = {r: s for r, s in self.stacks.items() if r not in gone}
        stacks.update((r, stack_report.RETURNED) for r in returned if r in stacks)
        silent = self.silent - gone
        if not stacks and not silent:
            return ""
        return stack_report.report(stacks, silent, self.died)

    def logs_of(self, hostname: str, local_rank: int | None) -> str:
        """Where a worker's (or, with ``None``, an agent's) output is written, if anywhere."""
        if self.log_folder is None:
            return ""
        agent = self.log_folder / f"{hostname}.log"
        if local_rank is None:
            return f"\nIts log: {agent}"
        return f"\nIts log: {self.log_folder / f'{hostname}[{local_rank}].log'} (agent: {agent})"


def resolve(  # noqa: PLR0913 -- one per part of what a run came back with
    failures: list[Failure],
    results: dict[int, list[Any]],
    hostnames: list[str],
    workers_per_host: list[int],
    evidence: Evidence,
    *,
    preemption: Preemption | None = None,
) -> LaunchResult[Any]:
    """Every rank's return value; or raise the failure that ended the run, explained.

    A run that had a preemption notice while in flight raises ``PreemptedError``, whether
    its ranks all returned within the grace or not.
    """
    if preemption is not None:
        raise preempted_exception(preemption, failures, results, workers_per_host, evidence)
    if failures:
        raise failure_exception(failures, results, hostnames, workers_per_host, evidence)
    offsets = [0, *itertools.accumulate(workers_per_host)]
    return LaunchResult(
        {
            host: [_unpickle(results, offsets[g] + r, host) for r in range(workers_per_host[g])]
            for g, host in enumerate(hostnames)
        }
    )


def failure_exception(
    failures: list[Failure],
    results: dict[int, list[Any]],
    hostnames: list[str],
    workers_per_host: list[int],
    evidence: Evidence,
) -> BaseException:
    """The exception of the failure that ended the run, with everything else it can tell.

    The first failure to arrive that is not a consequence of another: the errors a quit from
    the debugger, a worker's death or an agent's failure causes in the other ranks ("connection
    closed by peer") come after it, whenever they arrive. The others are listed, one line each.
    ``__notes__`` hold where the ranks still running were; ``stacks``, ``partial_results`` and
    ``failures`` the details.
    """
    real = [f for f in failures if not isinstance(f, (RunCancelled, RunPreempted))] or failures
    # the first that is no consequence of another: a host lost after a rank raised (the autopsy
    # could not reach it) leaves the rank's error first
    primary = next((f for f in real if not _caused_by_another(f)), real[0])
    exc = _exception(primary, hostnames, evidence)
    others = [f for f in real if f is not primary]
    caused = [_summary(f) for f in others if _caused_by_another(f)]
    also = [_summary(f) for f in others if not _caused_by_another(f)]
    if caused:
        add_note(exc, "collateral, after it in this run:\n  " + "\n  ".join(caused))
    if also:
        add_note(exc, "also in this run:\n  " + "\n  ".join(also))
    raised = [r for f in real if isinstance(f, WorkerRaised) for r in _ranks_of(f, [], [])]
    report = evidence.report(raised, results)
    if report:
        where = report.replace("\n", "\n  ")
        add_note(exc, f"where the ranks were (full stacks: .stacks):\n  {where}")
    by_rank: dict[int, BaseException] = {}
    for f in real:
        error = exc if f is primary else _exception(f, hostnames, evidence)
        by_rank.update(dict.fromkeys(_ranks_of(f, hostnames, workers_per_host), error))
    _attach(exc, "stacks", evidence.all_stacks())
    _attach(exc, "failures", dict(sorted(by_rank.items())))
    _attach(exc, "partial_results", _returned(results))
    return exc


def preempted_exception(
    preemption: Preemption,
    failures: list[Failure],
    results: dict[int, list[Any]],
    workers_per_host: list[int],
    evidence: Evidence,
) -> PreemptedError:
    """The ``PreemptedError`` of a run that had a notice: what returned, what did not."""
    world = sum(workers_per_host)
    returned = sorted(results)
    torn = [r for r in range(world) if r not in results]
    ended = next((f.reason for f in failures if isinstance(f, RunPreempted)), None)
    text = f"the run was preempted ({preemption.describe()}): "
    text += f"{len(returned)} of {world} ranks returned within the grace of {preemption.grace} s"
    if torn:
        who = (
            f"rank {torn[0]} did not and was"
            if len(torn) == 1
            else f"ranks {_list(torn)} did not and were"
        )
        text += f"; {who} torn down ({ended or 'they failed'})"
    exc = PreemptedError(
        text,
        signals={h: names[0] for h, names in preemption.signals.items()},
        partial_results=_returned(results),
    )
    real = [f for f in failures if not isinstance(f, (RunCancelled, RunPreempted))]
    if real:
        add_note(exc, "failures during the grace:\n  " + "\n  ".join(map(_summary, real)))
    raised = [r for f in real if isinstance(f, WorkerRaised) for r in _ranks_of(f, [], [])]
    report = evidence.report(raised, results)
    if report:
        where = report.replace("\n", "\n  ")
        add_note(exc, f"where the ranks torn down were (full stacks: .stacks):\n  {where}")
    _attach(exc, "stacks", evidence.all_stacks())
    return exc


def _list(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


_BROKEN_BY_A_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL is aborted",
    "was aborted",
)
"""What a rank raises when another one's end broke a collective under it."""


def _caused_by_another(failure: Failure) -> bool:
    """Collateral: an error a rank raised because another rank or host failed first."""
    if not isinstance(failure, WorkerRaised):
        return False
    e = failure.error
    return e.type.startswith("torch.distributed.Dist") or any(
        sign in e.message for sign in _BROKEN_BY_A_PEER
    )


def _ranks_of(failure: Failure, hostnames: list[str], workers_per_host: list[int]) -> list[int]:
    if isinstance(failure, (WorkerRaised, ResultUnpicklable)):
        return [failure.error.rank]
    if isinstance(failure, WorkerDied):
        return [failure.death.rank]
    if isinstance(failure, QuitInDebugger):
        return [failure.quit.rank]
    if isinstance(failure, AgentLost) and failure.hostname in hostnames:
        g = hostnames.index(failure.hostname)
        start = sum(workers_per_host[:g])
        return list(range(start, start + workers_per_host[g]))
    return []


def _returned(results: dict[int, list[Any]]) -> dict[int, Any]:
    """What the ranks that returned returned (those that cannot be unpickled here left out)."""
    values = {}
    for rank, frames in sorted(results.items()):
        with contextlib.suppress(Exception):
            values[rank] = serialization.loads(frames)
    return values


def _attach(exc: BaseException, name: str, value: object) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # an exception type without __dict__
        setattr(exc, name, value)


def _exception(failure: Failure, hostnames: list[str], evidence: Evidence) -> BaseException:
    if isinstance(failure, WorkerRaised):
        exc = _raised(failure)
        add_note(exc, f"raised by {_where(failure)} in torchrunx")
        return exc
    if isinstance(failure, ResultUnpicklable):
        e = failure.error
        text = (
            f"the return value of {_where(failure)}, a {e.value_type}, cannot be pickled: "
            f"{e.type}: {e.message}"
        )
        return _worker_error(failure, text, e.traceback)
    if isinstance(failure, WorkerDied):
        return _died(failure, evidence.logs_of(failure.hostname, failure.death.local_rank))
    if isinstance(failure, AgentLost):
        logs = evidence.logs_of(failure.hostname, None)
        return AgentFailedError(failure.reason + logs, hostname=failure.hostname)
    if isinstance(failure, QuitInDebugger):
        text = f"the run was quit from the debugger of {_where(failure)}: {failure.quit.text}"
        return DebuggerQuitError(text, hostname=failure.hostname, rank=failure.quit.rank)
    what = "preempted" if isinstance(failure, RunPreempted) else "cancelled"
    return TorchrunxError(f"the run on {hostnames} was {what}: {failure.reason}")


def _where(failure: WorkerRaised | ResultUnpicklable | WorkerDied | QuitInDebugger) -> str:
    m: Raised | Unpicklable | Died | Debug
    if isinstance(failure, WorkerDied):
        m = failure.death
    elif isinstance(failure, QuitInDebugger):
        m = failure.quit
    else:
        m = failure.error
    return f"rank {m.rank} (local rank {m.local_rank}) on {failure.hostname}"


def _summary(failure: Failure) -> str:
    if isinstance(failure, (WorkerRaised, ResultUnpicklable)):
        return f"{_where(failure)} raised {failure.error.type}: {failure.error.message}"
    if isinstance(failure, WorkerDied):
        d = failure.death
        how = f"signal {d.signal}" if d.signal is not None else f"exit code {d.exitcode}"
        return f"{_where(failure)} died ({how})"
    if isinstance(failure, AgentLost):  # its reason names it ("the agent on b sent nothing")
        return (failure.reason.splitlines() or [f"the agent on {failure.hostname} failed"])[0]
    if isinstance(failure, QuitInDebugger):
        return f"quit from the debugger of {_where(failure)}"
    if isinstance(failure, RunPreempted):
        return f"run preempted: {failure.reason}"
    return f"run cancelled: {failure.reason}"


def _died(failure: WorkerDied, logs: str) -> WorkerFailedError:
    d = failure.death
    if d.signal is not None:
        how = f"was killed by {d.signal}"
        cause = _LIKELY_CAUSES.get(d.signal)
        if cause:
            how += f" ({cause})"
    else:
        how = f"exited with code {d.exitcode} without returning a value"
    text = f"worker {_where(failure)}, pid {d.pid}, {how}"
    lines = "\n  ".join(d.tail)
    text += f".\nLast lines it wrote:\n  {lines}" if d.tail else ".\nIt wrote nothing."
    text += logs
    return WorkerFailedError(
        text,
        hostname=failure.hostname,
        rank=d.rank,
        local_rank=d.local_rank,
        exitcode=d.exitcode,
        signal_name=d.signal,
        last_lines=d.tail,
    )


def _raised(failure: WorkerRaised) -> BaseException:
    e = failure.error
    if e.unpicklable is not None:
        text = (
            f"{_where(failure)} raised {e.type}: {e.message}; the exception itself cannot be "
            f"pickled ({e.unpicklable}), so it is given here as text"
        )
        return _worker_error(failure, text, e.traceback)
    try:
        exc = serialization.loads(failure.frames)
    except Exception as error:  # noqa: BLE001 -- e.g. its class is not importable here
        text = (
            f"{_where(failure)} raised {e.type}: {e.message}; it cannot be unpickled in the "
            f"launcher ({type(error).__name__}: {error})"
        )
        return _worker_error(failure, text, e.traceback)
    if not isinstance(exc, BaseException):
        text = f"{_where(failure)} sent back a {type(exc).__name__} as its exception"
        return _worker_error(failure, text, e.traceback)
    exc.__cause__ = RemoteTraceback(e.traceback)
    return exc


def _worker_error(
    failure: WorkerRaised | ResultUnpicklable, text: str, traceback: str
) -> WorkerFailedError:
    e = failure.error
    error = WorkerFailedError(text, hostname=failure.hostname, rank=e.rank, local_rank=e.local_rank)
    error.__cause__ = RemoteTraceback(traceback)
    return error


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, on every Python this runs on."""
    notes: list[str] = [*getattr(exc, "__notes__", []), note]
    setattr(exc, "__notes__", notes)  # noqa: B010 -- add_note() and a typed __notes__ are 3.11+


def _unpickle(results: dict[int, list[Any]], rank: int, hostname: str) -> Any:
    """The return value of ``rank``, unpickled here in the caller's thread."""
    if rank not in results:
        msg = f"rank {rank} on {hostname} ended without sending its return value"
        raise WorkerFailedError(msg, hostname=hostname, rank=rank)
    try:
        return serialization.loads(results[rank])
    except Exception as e:
        msg = (
            f"the return value of rank {rank} on {hostname} cannot be unpickled in the "
            f"launcher: {type(e).__name__}: {e}"
        )
        raise WorkerFailedError(msg, hostname=hostname, rank=rank) from e
