"""The errors a run raises when a worker or an agent fails, and remote tracebacks.

An exception raised by the user's function is re-raised in the launcher as its own type, with the
worker's formatted traceback chained as ``__cause__`` (a ``RemoteTraceback``) and the host and
rank in ``__notes__``: the pattern of ``concurrent.futures.process``.
"""

from __future__ import annotations

__all__ = [
    "AgentFailedError",
    "DebuggerQuitError",
    "NotRunError",
    "PreemptedError",
    "RemoteTraceback",
    "TorchrunxError",
    "WorkerFailedError",
]


class TorchrunxError(Exception):
    """Base class of the errors torchrunx raises for failures of its own processes."""


class AgentFailedError(TorchrunxError):
    """An agent died, did not start within ``agent_timeout``, or was silent (heartbeat_timeout).

    Silent once started, its host is lost: a restart gives its ranks to a spare, if any.
    """

    def __init__(self, message: str, *, hostname: str | None = None) -> None:
        super().__init__(message)
        self.hostname = hostname
        """The host whose agent failed (``None`` where no one host is to blame)."""


class WorkerFailedError(TorchrunxError):
    """A worker ended without a result: killed by a signal, a segfault, ``os._exit``, ``sys.exit``.

    Also raised when a return value or an exception cannot cross back to the launcher (pickling).
    """

    def __init__(  # noqa: PLR0913 -- keyword-only: one per attribute of the error
        self,
        message: str,
        *,
        hostname: str | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        exitcode: int | None = None,
        signal_name: str | None = None,
        last_lines: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.hostname = hostname
        """The worker's host."""
        self.rank = rank
        """The worker's global rank."""
        self.local_rank = local_rank
        """Its rank on its host."""
        self.exitcode = exitcode
        """Its exit status, if it exited (``sys.exit``, ``os._exit``)."""
        self.signal_name = signal_name
        """The signal that killed it (``"SIGKILL"``, ``"SIGSEGV"``), if one did."""
        self.last_lines = last_lines
        """The last lines it wrote to stdout and stderr."""


class DebuggerQuitError(TorchrunxError):
    """The run was ended from the debugger: ``q``, end of input or Ctrl-C at a rank's prompt."""

    def __init__(self, message: str, *, hostname: str, rank: int) -> None:
        super().__init__(message)
        self.hostname = hostname
        """The host of the rank whose prompt ended the run."""
        self.rank = rank
        """That rank."""


class RemoteTraceback(Exception):  # noqa: N818 -- named as in concurrent.futures.process
    """The formatted traceback of an exception raised in a worker; chained as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class PreemptedError(TorchrunxError):
    """The run was preempted: a preemption signal reached the launcher, an agent or a host.

    Its ranks had ``Launcher.preempt_grace`` seconds to return (to stop at a checkpoint):
    ``partial_results`` holds what those that did returned, by rank; the others were torn down
    and the message says where they were. ``signals``: which signal reached which host (the
    launcher's own host as ``"launcher"``).
    """

    def __init__(
        self,
        message: str,
        *,
        signals: dict[str, str],
        partial_results: dict[int, object],
    ) -> None:
        super().__init__(message)
        self.signals = signals
        """Which signal reached which host (``"launcher"``: this process)."""
        self.partial_results = partial_results
        """What the ranks that returned within the grace returned, by rank."""


class NotRunError(TorchrunxError):
    """An item of a sweep that never ran.

    The sweep was closed, cancelled or preempted first, or no host was left to run it on
    (``reason`` says which).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """``"closed"``, ``"cancelled"``, ``"preempted"``, or why no host was left."""
