"""Turning what came back from a run into what ``run()`` returns or raises."""

from __future__ import annotations

__all__ = ["raise_failure", "unpickle_result"]

from typing import TYPE_CHECKING, Any, NoReturn

from .errors import AgentFailedError, RemoteTraceback, TorchrunxError, WorkerFailedError
from .transport import serialization

if TYPE_CHECKING:
    from .controller import RunState

_LIKELY_CAUSES = {
    "SIGKILL": "killed from outside, often by the kernel's out-of-memory killer",
    "SIGSEGV": "a segmentation fault, usually in a C/C++/CUDA extension",
    "SIGABRT": "aborted, e.g. by a failed assertion in native code",
    "SIGBUS": "a bus error, e.g. /dev/shm too small for shared memory",
}


def _where(h: dict[str, Any]) -> str:
    return f"rank {h.get('rank')} (local rank {h.get('local_rank')}) on {h.get('hostname')}"


def _summary(kind: str, h: dict[str, Any]) -> str:
    if kind == "error":
        return f"{_where(h)} raised {h.get('type')}: {h.get('message')}"
    if kind == "died":
        how = f"signal {h['signal']}" if "signal" in h else f"exit code {h.get('exitcode')}"
        return f"{_where(h)} died ({how})"
    if kind == "agent":
        return f"the agent on {h.get('hostname')} failed"
    return f"run cancelled: {h.get('reason')}"


def _died(h: dict[str, Any]) -> WorkerFailedError:
    if "signal" in h:
        sig = h["signal"]
        how = f"was killed by {sig}"
        cause = _LIKELY_CAUSES.get(sig)
        if cause:
            how += f" ({cause})"
    else:
        how = f"exited with code {h.get('exitcode')} without returning a value"
    tail = tuple(h.get("tail", ()))
    text = f"worker {_where(h)}, pid {h.get('pid')}, {how}"
    text += ".\nLast lines it wrote:\n  " + "\n  ".join(tail) if tail else ".\nIt wrote nothing."
    return WorkerFailedError(
        text,
        hostname=h.get("hostname"),
        rank=h.get("rank"),
        local_rank=h.get("local_rank"),
        exitcode=h.get("exitcode"),
        signal_name=h.get("signal"),
        last_lines=tail,
    )


def _raised(h: dict[str, Any], frames: list[Any]) -> BaseException:
    cause = RemoteTraceback(h.get("traceback", ""))
    if "unpicklable_result" in h:
        text = (
            f"the return value of {_where(h)}, a {h['unpicklable_result']}, cannot be "
            f"pickled: {h.get('type')}: {h.get('message')}"
        )
    elif not frames:
        text = (
            f"{_where(h)} raised {h.get('type')}: {h.get('message')}; the exception itself "
            f"cannot be pickled ({h.get('unpicklable')}), so it is given here as text"
        )
    else:
        try:
            exc = serialization.loads(frames)
        except Exception as e:  # noqa: BLE001 -- e.g. its class is not importable here
            text = (
                f"{_where(h)} raised {h.get('type')}: {h.get('message')}; it cannot be "
                f"unpickled in the launcher ({type(e).__name__}: {e})"
            )
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = cause
                return exc
            text = f"{_where(h)} sent back a {type(exc).__name__} as its exception"
    error = WorkerFailedError(
        text, hostname=h.get("hostname"), rank=h.get("rank"), local_rank=h.get("local_rank")
    )
    error.__cause__ = cause
    return error


def _add_note(exc: BaseException, note: str) -> None:
    notes: list[str] = [*getattr(exc, "__notes__", []), note]
    setattr(exc, "__notes__", notes)  # noqa: B010 -- add_note() and a typed __notes__ are 3.11+


def raise_failure(run: RunState, hostnames: list[str]) -> NoReturn:
    """Raise the failure that caused the run to end; summarise the others in ``__notes__``.

    A worker's death or an agent's failure comes first: the errors it causes in the other ranks
    ("connection closed by peer") are consequences, not causes.
    """
    failures = [f for f in run.failures if f[0] != "cancelled"] or run.failures
    primary = next((f for f in failures if f[0] in ("died", "agent")), failures[0])
    kind, header, frames = primary
    exc: BaseException
    if kind == "error":
        exc = _raised(header, frames)
        _add_note(exc, f"raised by {_where(header)} in torchrunx")
    elif kind == "died":
        exc = _died(header)
    elif kind == "agent":
        host = header.get("hostname")
        agent = next((a for a in run.agents if a.hostname == host), None)
        text = agent.describe_failure() if agent is not None else f"the agent on {host} failed"
        exc = AgentFailedError(text, hostname=host)
    else:
        exc = TorchrunxError(f"the run on {hostnames} was cancelled: {header.get('reason')}")
    others = [_summary(k, h) for k, h, _ in failures if (k, h) != (kind, header)]
    if others:
        _add_note(exc, "other failures in this run:\n  " + "\n  ".join(others))
    raise exc


def unpickle_result(run: RunState, rank: int, hostname: str) -> Any:
    """The return value of ``rank``, unpickled here in the caller's thread."""
    if rank not in run.results:
        msg = f"rank {rank} on {hostname} ended without sending its return value"
        raise WorkerFailedError(msg, hostname=hostname, rank=rank)
    _, frames = run.results[rank]
    try:
        # zmq.Frame has the buffer protocol, but pyzmq's stubs do not declare it
        return serialization.loads(frames)  # type: ignore[arg-type]
    except Exception as e:
        msg = (
            f"the return value of rank {rank} on {hostname} cannot be unpickled in the "
            f"launcher: {type(e).__name__}: {e}"
        )
        raise WorkerFailedError(msg, hostname=hostname, rank=rank) from e
