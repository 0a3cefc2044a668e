"""The agent's output pump: what the workers write, read from their pipes and sent on as lines.

::

    worker ──stdout/stderr pipes──► OutputPump ──Output (whole lines, redraws)──► launcher
                                      ▲  │ counts what it sent
                                      │  ▼
                                    Credit: what the launcher has taken (the window)

Each worker's stdout and stderr are pipes of 1 MiB that the agent reads in big bites. Only whole
lines go out (a partial line waits for its end), except the latest state of a line redrawn with
carriage returns (a progress bar). A pipe that floods rests a moment, to be read in bigger bites.
The launcher confirms what it has taken (``Credit``): past a window of output it has not, the
pipes are no longer read (their writers block, losing nothing) while everything else is served.
"""

from __future__ import annotations

__all__ = ["READS_AT_EXIT", "TAIL_LINES", "OutputPump", "WorkerOutput"]

import contextlib
import fcntl
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from .logs import readable_line
from .transport.messages import Level, Output, Stream

if TYPE_CHECKING:
    from collections.abc import Callable

TAIL_LINES = 20
"""Lines of a worker's output kept for the message of a ``WorkerFailedError``."""
READS_AT_EXIT = 1024  # a dead worker's pipe holds at most what it wrote last (1 MiB here)
_READ_SIZE = 1 << 16
_READS_PER_EVENT = 16  # at most 1 MiB from one pipe before the loop looks at anything else
_OUTPUT_WINDOW = 8 << 20  # bytes of output the launcher may be behind before we stop reading
_TAIL_BYTES = 8192
_PIPE_SIZE = 1 << 20  # Linux's default most (/proc/sys/fs/pipe-max-size)
_FLOOD_BYTES = 4 << 10  # read this much at once, a pipe rests (see OutputPump.rest)
_REST_S = 0.002

_NOISE = b"[c10d] The hostname of the client socket cannot be retrieved"
"""torch's TCPStore looks up each client's name for its log and warns, once per peer and run,
wherever there is no reverse DNS (most clusters): nothing anyone can act on, so not passed on."""


@dataclass(eq=False)
class WorkerOutput:
    """One worker's output as the pump has it: its pipes, its unfinished lines, its last words."""

    run: str
    rank: int
    local_rank: int
    pipes: dict[int, Stream] = field(default_factory=dict)  # by read end
    inodes: tuple[int, ...] = ()  # of the pipes: a process holding one is of the worker's run
    partial: dict[Stream, bytes] = field(default_factory=dict)
    # the last lines of each stream: a flood on one must not push the other's last words out
    tails: dict[Stream, deque[str]] = field(
        default_factory=lambda: {s: deque(maxlen=TAIL_LINES) for s in ("stdout", "stderr")}
    )
    last_line: str = ""
    last_output: float | None = None  # monotonic

    def last_words(self) -> tuple[str, ...]:
        """Its last lines of each stream, unfinished ones too, for the report of its death."""
        tail: list[str] = []
        for stream in ("stdout", "stderr"):  # stderr last: where a death usually says why
            partial = self.partial.get(stream, b"").decode(errors="replace")
            lines = [line for line in (*self.tails[stream], partial) if line]
            tail += lines[-(TAIL_LINES // 2) :]
        return tuple(tail)


class OutputPump:
    """Reads the workers' pipes, sends their lines on, and keeps within the launcher's window.

    It owns the pipes' registrations with the agent's poller: a pipe is registered while it is
    read, neither resting nor held back by the window.
    """

    def __init__(self, poller: zmq.Poller, send: Callable[[Output, bytes], None]) -> None:
        self.poller = poller
        self.send = send
        self.by_fd: dict[int, WorkerOutput] = {}
        # flow control: output the launcher has not confirmed yet; past the window we stop
        # reading the workers' pipes (they block, losing nothing) but keep serving everything else
        self.unconfirmed = 0
        self.reading = True
        self.resting: dict[int, float] = {}  # flooded pipes not polled until then (monotonic)

    def open(self, output: WorkerOutput) -> list[int]:
        """A worker's stdout and stderr pipes: we read them; the write ends are returned."""
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        for fd in (out_w, err_w):
            # room for a flood: its writer rarely waits for us, and we read it in big bites
            with contextlib.suppress(OSError):  # past the user's pipe quota: the default size
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        output.pipes = {out_r: "stdout", err_r: "stderr"}
        output.inodes = (os.fstat(out_r).st_ino, os.fstat(err_r).st_ino)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self.by_fd[fd] = output
            if self.reading:
                self.poller.register(fd, zmq.POLLIN)
        return [out_w, err_w]

    def timeout(self, longest_ms: int, now: float) -> int:
        """How long the loop may wait for events (ms): at most until the first rest ends."""
        if not self.resting:
            return longest_ms
        return min(longest_ms, math.ceil((min(self.resting.values()) - now) * 1000))

    def drain(self, output: WorkerOutput) -> None:
        """Forward all a worker wrote: it has exited, or its outcome is to follow its output."""
        for fd in list(output.pipes):
            self.on_output(fd, READS_AT_EXIT)

    def on_output(self, fd: int, max_reads: int = _READS_PER_EVENT) -> None:
        """Forward what a worker wrote, whole lines only (a partial line waits for its end).

        What its other pipe holds while resting, or when this one is stderr, was most likely
        written before: it goes first, so that a line on stderr after a flood on stdout comes
        after the flood (the poller may name stderr first when both are ready; a stdout event
        does not look at stderr, which keeps a flood's reads as they are).
        """
        output = self.by_fd.get(fd)
        if output is None:
            return
        first = output.pipes.get(fd) == "stderr"
        for other in list(output.pipes):
            if other != fd and (first or other in self.resting):
                self.forward(other, output, READS_AT_EXIT)
        self.forward(fd, output, max_reads)

    def forward(self, fd: int, output: WorkerOutput, max_reads: int) -> None:
        """Read one of a worker's pipes and send on its whole lines."""
        stream = output.pipes[fd]
        data, eof = _read_available(fd, max_reads)
        if len(data) >= _FLOOD_BYTES and max_reads == _READS_PER_EVENT and not eof:
            self.rest(fd)
        data = output.partial.pop(stream, b"") + data
        if not eof:
            data, newline, rest = data.rpartition(b"\n")
            data += newline
            if rest:
                output.partial[stream] = self.redraw(output, stream, rest)
        if _NOISE in data:
            data = b"".join(x for x in data.splitlines(keepends=True) if _NOISE not in x)
        if data:
            self.remember(output, stream, data)
            self.send_output(output, stream, data)
        if eof:
            self.close(fd, output)

    def remember(self, output: WorkerOutput, stream: Stream, data: bytes) -> None:
        """Keep the last lines: for the report of the worker's death, and for its status."""
        last = data[-_TAIL_BYTES:].decode(errors="replace").split("\n")
        lines = [readable_line(line) for line in last if line]
        output.tails[stream].extend(lines)
        output.last_line = lines[-1] if lines else output.last_line
        output.last_output = time.monotonic()

    def close(self, fd: int, output: WorkerOutput) -> None:
        """The pipe's writers are all gone: forget it."""
        if self.reading and self.resting.pop(fd, None) is None:
            self.poller.unregister(fd)
        os.close(fd)
        del output.pipes[fd]
        del self.by_fd[fd]

    def redraw(self, output: WorkerOutput, stream: Stream, line: bytes) -> bytes:
        """A line redrawn with carriage returns (a progress bar) goes out as it is now.

        Only its latest state is kept: the earlier ones are drawn over.
        """
        cut = line.rfind(b"\r")
        if cut < 0:
            return line
        if cut + 1 < len(line):
            self.send_output(output, stream, line[cut + 1 :], redraw=True)
        return line[cut:]

    def send_output(
        self, output: WorkerOutput, stream: Stream, data: bytes, *, redraw: bool = False
    ) -> None:
        """Send a worker's output on; it counts against the launcher's window."""
        level: Level = "INFO" if stream == "stdout" else "WARNING"
        where = Output(output.run, output.rank, output.local_rank, stream, level, redraw=redraw)
        self.send(where, data)
        self.on_credit(-len(data))

    def rest(self, fd: int) -> None:
        """A flood: leave the pipe alone a moment, to read it in bigger bites.

        Its writer goes on into the pipe's room without waking us at every line, and the
        launcher gets fewer, larger messages; the lines are late by at most ``_REST_S``.
        """
        if self.reading and fd not in self.resting:
            self.poller.unregister(fd)
            self.resting[fd] = time.monotonic() + _REST_S

    def wake_rested(self) -> None:
        """Poll again the pipes whose rest is over."""
        now = time.monotonic()
        for fd, until in list(self.resting.items()):
            if until <= now:
                del self.resting[fd]
                if self.reading and fd in self.by_fd:
                    self.poller.register(fd, zmq.POLLIN)

    def on_credit(self, confirmed: int) -> None:
        """Count output confirmed by the launcher (negative: sent); pause or resume reading."""
        self.unconfirmed -= confirmed
        if self.reading and self.unconfirmed > _OUTPUT_WINDOW:
            self.reading = False
            for fd in self.by_fd:
                if fd not in self.resting:
                    self.poller.unregister(fd)
            self.resting.clear()
        elif not self.reading and self.unconfirmed <= _OUTPUT_WINDOW // 2:
            self.reading = True
            for fd in self.by_fd:
                self.poller.register(fd, zmq.POLLIN)


def _read_available(fd: int, max_reads: int) -> tuple[bytes, bool]:
    """What the pipe holds, and whether its writers are all gone.

    At most ``max_reads`` reads: a flooding worker must not starve the loop.
    """
    chunks: list[bytes] = []
    for _ in range(max_reads):
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            break
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False
