"""A thread that owns a poller and runs the calls other threads hand it: ``ServingThread``.

::

    user thread ── on_thread(fn, *args) ──► queue + a byte on the wake pipe ──┐
                ◄─ call_and_wait(fn) ── its result or its error (bounded) ─┐   ▼
                                                     serving thread: poll ─┴─ tick, readable

The launcher's controller is one (it owns the ZeroMQ sockets, which are not thread-safe): all
its state is touched by its thread only, and every other thread goes through these calls.
"""

from __future__ import annotations

__all__ = ["ServingThread"]

import contextlib
import functools
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import zmq

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
P = ParamSpec("P")

ANSWER_TIMEOUT_S = 10.0
"""How long a user thread waits for the serving thread to answer a call."""
POLL_MS = 200
"""The longest the thread sleeps between two ticks."""


class ServingThread:
    """A poller served on a thread of its own: subclasses say what a tick and a readable do."""

    def __init__(self, name: str) -> None:
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.poller = zmq.Poller()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._stopping = False

    def start(self) -> None:
        """Start serving (on the thread)."""
        self.thread.start()

    def on_thread(self, fn: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
        """Call ``fn(*args, **kwargs)`` on the thread, soon."""
        self._calls.put(functools.partial(fn, *args, **kwargs))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def call_and_wait(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the thread: its result (or its error, raised here)."""
        done = threading.Event()
        outcome: list[Any] = []

        def wrapped() -> None:
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except Exception as e:  # noqa: BLE001 -- handed to the caller's thread
                outcome.append((False, e))
            finally:
                done.set()

        self.on_thread(wrapped)
        if not done.wait(ANSWER_TIMEOUT_S):
            msg = f"the {self.thread.name} thread did not answer within {ANSWER_TIMEOUT_S} s"
            raise RuntimeError(msg)
        ok, value = outcome[0]
        if not ok:
            raise value
        return cast("T", value)

    def stop(self) -> None:
        """End the thread (after the current iteration); ``closing()`` runs on it."""
        self._stopping = True
        self.on_thread(_nothing)
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)

    def tick(self) -> None:
        """Called on the thread before each poll (at least every ``POLL_MS``)."""

    def on_readable(self, sock: Any) -> None:
        """A socket or fd of the poller (not the wake pipe) is readable."""

    def closing(self) -> None:
        """The thread ends: close what it owns."""

    def _serve(self) -> None:
        try:
            while not self._stopping:
                self.tick()
                for sock, _ in self.poller.poll(POLL_MS):
                    if sock == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        self.on_readable(sock)
                while not self._calls.empty():
                    self._calls.get()()
        finally:
            self.closing()
            os.close(self._wake_r)
            os.close(self._wake_w)


def _nothing() -> None:
    """A call that only wakes the thread."""
