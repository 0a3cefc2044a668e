"""Runs in flight: :class:`RunHandle`, a ``concurrent.futures.Future`` of a ``LaunchResult``."""

from __future__ import annotations

__all__ = ["RunHandle"]

import concurrent.futures
import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from .result import LaunchResult

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from .outcome import Evidence
    from .transport.messages import RankStatus

FunctionR = TypeVar("FunctionR")

CANCEL_TIMEOUT_S = 15.0
"""How long ``cancel()`` waits for the run's processes to be gone everywhere."""


class RunHandle(concurrent.futures.Future[LaunchResult[FunctionR]]):
    """A run started by ``Launcher.submit``, as a ``concurrent.futures.Future``.

    ``result()`` (raising what ``Launcher.run`` would), ``exception()``, ``done()``, ``cancel()``,
    ``add_done_callback()``; ``concurrent.futures.wait`` and ``as_completed`` take it.
    """

    def __init__(  # noqa: PLR0913 -- one per thing of the run the launcher hands over
        self,
        run_id: str,
        cancel_run: Callable[[], None],
        finished: threading.Event,
        dump_stacks: Callable[[float], dict[int, str]],
        evidence: Evidence,
        *,
        status: Callable[[float], dict[int, RankStatus]] | None = None,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        """The run's id, also ``$TORCHRUNX_RUN_ID`` in its workers."""
        self._cancel_run = cancel_run
        self._finished = finished
        self._dump_stacks = dump_stacks
        self._evidence = evidence
        self._status = status
        self._last_status: dict[int, RankStatus] = {}
        self._cancelling = False

    def status(self, timeout: float = 5.0) -> dict[int, RankStatus]:
        """How every rank is now, by rank: host, pid, state, memory, CPU, GPU, last output.

        ``state`` is ``starting``, ``running``, ``returned`` or ``failed``; once the run has
        ended everywhere, ``cleared`` (with what the last status said of the rest). Hosts that
        do not answer within ``timeout`` s are left out. Cheap: one message per host.
        """
        if not self._finished.is_set() and self._status is not None:
            self._last_status = self._status(timeout) or self._last_status
            if not self._finished.is_set():
                return dict(self._last_status)
        return {r: dataclasses.replace(s, state="cleared") for r, s in self._last_status.items()}

    def stacks(self, timeout: float = 5.0) -> dict[int, str]:
        """Every live rank's Python stack (all threads), by rank, without stopping the run.

        Ranks blocked in C (a collective, a sleep) show their Python frames; a rank that cannot
        answer within ``timeout`` s shows why. Once the run has ended: the stacks its ranks had
        when it failed or was cancelled (none if it succeeded).
        """
        if self._finished.is_set():
            return self._evidence.all_stacks()
        return self._dump_stacks(timeout)

    def autopsy(self) -> str:
        """Where the ranks still running were when the run failed or was cancelled (grouped)."""
        return self._evidence.report()

    def partial_results(self) -> dict[int, Any]:
        """After a failure: what the ranks that had returned returned, by rank."""
        error = self.exception() if self.done() and not self.cancelled() else None
        if error is None:
            return dict(enumerate(self.result().by_rank())) if self.done() else {}
        return dict(getattr(error, "partial_results", {}))

    def failures(self) -> dict[int, BaseException]:
        """After a failure: each failed rank's failure, as the exception it would raise."""
        error = self.exception() if self.done() and not self.cancelled() else None
        return {} if error is None else dict(getattr(error, "failures", {}))

    def cancel(self) -> bool:
        """Kill this run's workers everywhere (other runs and the agents stay); False if done.

        Returns once its processes are gone (at most ``CANCEL_TIMEOUT_S``).
        """
        if self.done():
            return False
        self._cancelling = True  # the run's own end (a "cancelled" failure) must not win
        self._cancel_run()
        self._finished.wait(CANCEL_TIMEOUT_S)
        return super().cancel()

    def settle(self, outcome: Callable[[], Any]) -> None:
        """Set the result from ``outcome()`` or the exception it raises, unless cancelled.

        Called by the launcher when the run has ended everywhere.
        """
        if self._cancelling:
            return
        try:
            value = outcome()
        except BaseException as e:  # noqa: BLE001 -- it belongs to whoever waits on the handle
            self._set(self.set_exception, e)
        else:
            self._set(self.set_result, value)

    def _set(self, setter: Callable[[Any], None], value: Any) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            setter(value)  # unless cancelled meanwhile: the cancellation stands
