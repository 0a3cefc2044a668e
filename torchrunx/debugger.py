"""A debugger on any rank: pdb in the worker, its prompt in the launcher's terminal.

::

    worker (rank r)                        agent                 launcher
    breakpoint() ─► pdb ── debug {text, state} ──► ─────────────► console: prints it,
                     ▲                                              reads a line
                     └─────────── debug-input {line} ◄── ◄─────────┘

pdb's stdin and stdout here are the worker's control-plane socket (``Channel``): no port, no
tunnel. A session ends with ``c`` (the rank goes on) or ``q`` / end of input / Ctrl-C in the
launcher (the run ends, as a failure does, with ``DebuggerQuitError``).
Without a terminal at the launcher a ``breakpoint()`` is skipped with one warning line, so that a
batch job never waits for a person who is not there.
"""

from __future__ import annotations

__all__ = ["Channel", "install", "post_mortem"]

import contextlib
import io
import os
import pdb  # noqa: T100 -- the debugger is this module's job
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, cast

from . import sources
from .transport.messages import Debug, DebugInput, DebugSettings, DebugState

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType, TracebackType

QUIT_GRACE_S = 60.0
"""How long a rank that quit waits to be torn down by its agent before it exits by itself."""
_OUR_MODULES = ["torchrunx", "torchrunx.*"]  # never stopped in: stepping out of the function ends


class Channel(io.TextIOBase):
    """pdb's stdin and stdout: what it writes goes to the launcher, lines typed there come back.

    ``send`` and ``receive`` use the worker's socket to its agent (one at a time: a lock).
    """

    def __init__(
        self,
        send: Callable[[Debug], None],
        receive: Callable[[], DebugInput],
        where: tuple[str, int, int],
    ) -> None:
        super().__init__()
        self._send = send
        self._receive = receive
        self.run, self.rank, self.local_rank = where
        self._pending: list[str] = []
        self.why = ""  # why the session opens; sent with its first message, then cleared
        self.quit_reason = ""  # how the input ended, if it did
        self.open = False  # a session is open in the launcher: its terminal is this rank's
        self.completer: Callable[[str, int], list[str]] = lambda _line, _begin: []

    def write(self, text: str) -> int:
        """Buffer pdb's output: it leaves with the next flush or prompt."""
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """Send what pdb wrote, if anything."""
        if self._pending:
            self.post("output")

    def readline(self, _size: int | None = -1) -> str:  # type: ignore[override]
        """Ask the launcher for a line (the prompt is out); ``""`` (end of input) if it ended."""
        self.post("prompt")
        answer = self._receive()
        while answer.complete is not None and answer.line is not None:  # Tab, not a line yet
            words = self.completer(answer.line, answer.complete)
            self._send(Debug(self.run, self.rank, self.local_rank, "\n".join(words), "completions"))
            answer = self._receive()
        if answer.line is None:
            self.quit_reason = answer.why or "end of input at the prompt"
            return ""
        return answer.line if answer.line.endswith("\n") else answer.line + "\n"

    def isatty(self) -> bool:
        """Not a terminal: pdb must not set one up (readline, colours)."""
        return False

    def post(self, state: DebugState) -> None:
        """Send what is pending with ``state`` (see ``Debug``)."""
        text, self._pending = "".join(self._pending), []
        why, self.why = self.why, ""
        self.open = state in ("output", "prompt")
        self._send(Debug(self.run, self.rank, self.local_rank, text, state, why))

    def skipped(self, warning: str) -> None:
        """A breakpoint was skipped: the launcher shows ``warning`` (agents' warnings are live)."""
        self._send(Debug(self.run, self.rank, self.local_rank, warning, "skipped"))

    def quit(self, reason: str) -> None:
        """Tell the launcher to end the run, and why (``'q' at the prompt``)."""
        self.flush()
        self._pending = [reason]
        self.post("quit")


class _RankPdb(pdb.Pdb):
    """pdb on a ``Channel``; ``c`` frees the launcher's terminal, ``q`` ends the run."""

    def __init__(self, channel: Channel, prompt: str) -> None:
        stream = cast("IO[str]", channel)  # pdb needs only write, flush and readline
        super().__init__(stdin=stream, stdout=stream, skip=_OUR_MODULES, nosigint=True)
        self.prompt = prompt
        self.channel = channel
        channel.completer = self.completions

    def completions(self, line: str, begin: int) -> list[str]:
        """What Tab offers for the word at ``begin`` of ``line``, as pdb's own ``complete`` would.

        The launcher's readline has the line; this rank has the frames the names come from.
        """
        text = line[begin:]
        try:
            if begin > len(line) - len(line.lstrip()):  # an argument: the command's completer
                command, _, _ = self.parseline(line.lstrip())
                complete = getattr(self, f"complete_{command}", None) if command else None
                return list((complete or self.completedefault)(text, line, begin, len(line)))
            return list(self.completenames(text, line, begin, len(line)))
        except Exception:  # noqa: BLE001 -- a completer's bug must not end the session
            return []

    def get_stack(
        self, f: FrameType | None, t: TracebackType | None
    ) -> tuple[list[tuple[FrameType, int]], int]:
        """The stack ``w`` shows and ``u`` climbs: without the worker's frames around it."""
        stack, index = super().get_stack(f, t)
        outer = 0
        while outer < min(index, len(stack) - 1) and _ours(stack[outer][0]):
            outer += 1
        return stack[outer:], index - outer

    def do_continue(self, arg: str) -> bool | None:
        """Go on; the session is over until the rank stops again."""
        stop = super().do_continue(arg)
        self.channel.post("over")
        return stop

    do_c = do_cont = do_continue

    def do_quit(self, arg: str) -> bool | None:  # noqa: ARG002 -- pdb's signature
        """End the run: the launcher tears it down, as it does after a failure."""
        self.channel.quit(self.channel.quit_reason or "'q' at the prompt")
        _wait_for_teardown()
        return None

    do_q = do_exit = do_quit

    def do_EOF(self, arg: str) -> bool | None:  # noqa: N802 -- pdb's name for end of input
        """End of input at the prompt: as ``q``."""
        return self.do_quit(arg)


def _wait_for_teardown() -> None:
    """The launcher ends the run now (autopsy, then kill); this rank waits for that, bounded."""
    time.sleep(QUIT_GRACE_S)
    os._exit(1)


class _Debugger:
    """What ``breakpoint()``, ``pdb.set_trace()`` and post-mortems do in one worker."""

    def __init__(self, settings: DebugSettings, rank: int, hostname: str, channel: Channel) -> None:
        self.settings = settings
        self.rank = rank
        self.prompt = f"(Pdb rank {rank} @ {hostname}) "
        self.channel = channel
        self.pid = os.getpid()
        self.lock = threading.Lock()  # one session per rank at a time (threads of the rank)
        self.warned: set[str] = set()

    def may_stop(self, frame: FrameType, what: str) -> bool:
        """Whether a session may open here; says why not, once per place, where it matters."""
        if self.settings.ranks is not None and self.rank not in self.settings.ranks:
            return False  # the user chose other ranks: no word, however often it is called
        place = _place(frame)
        if os.getpid() != self.pid:
            why = f"in a child process (pid {os.getpid()}) of rank {self.rank}"
        elif not self.settings.terminal:
            why = f"on rank {self.rank}: the launcher's stdin is not a terminal"
        else:
            return True
        if place not in self.warned:
            self.warned.add(place)
            line = (
                f"torchrunx: {what} at {place} skipped {why} "
                "(PYTHONBREAKPOINT=0 skips breakpoints silently)"
            )
            if os.getpid() == self.pid:  # the agent shows it with its own warnings
                self.channel.skipped(line)
            else:  # a child's socket is its parent's: not to be used
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        return False

    def set_trace(self, frame: FrameType, header: str | None = None) -> None:
        """Stop in ``frame`` (the caller of ``breakpoint()``): a session in the launcher."""
        if not self.may_stop(frame, "breakpoint()"):
            return
        with self.lock:
            session = _RankPdb(self.channel, self.prompt)
            self.channel.why = f"breakpoint() at {_place(frame)}"
            if header is not None:
                session.message(header)
            session.set_trace(frame)

    def post_mortem(self, error: BaseException) -> None:
        """A session at the frame that raised ``error``, before the run hears of it."""
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or not self.may_stop(tb.tb_frame, "post-mortem"):
            return
        with self.lock:
            session = _RankPdb(self.channel, self.prompt)
            self.channel.why = f"post-mortem: {type(error).__name__} at {_place(tb.tb_frame)}"
            session.reset()
            session.interaction(None, _user_traceback(error.__traceback__))
            if self.channel.open:  # ended by a step out of the dead frames, not by "c"
                self.channel.post("over")


def _place(frame: FrameType) -> str:
    """``file:line``, the file relative to the working directory where it is inside it."""
    path = frame.f_code.co_filename
    with contextlib.suppress(ValueError):  # another drive, or no working directory
        relative = os.path.relpath(path)
        path = path if relative.startswith("..") else relative
    return f"{path}:{frame.f_lineno}"


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the user's function on: our frames above it are nothing to debug."""
    while tb is not None and tb.tb_next is not None and _ours(tb.tb_frame):
        tb = tb.tb_next
    return tb


def _ours(frame: FrameType) -> bool:
    """A frame of this package (the worker around the function), or of ``runpy``."""
    return sources.is_ours(frame.f_code.co_filename)


_debugger: _Debugger | None = None


def install(settings: DebugSettings, rank: int, hostname: str, channel: Channel) -> None:
    """In a worker: ``breakpoint()`` and ``pdb.set_trace()`` open sessions in the launcher.

    ``breakpoint()`` keeps its meaning where ``PYTHONBREAKPOINT`` names another hook (or ``0``).
    """
    global _debugger  # noqa: PLW0603 -- one debugger per worker process, as pdb has one hook
    _debugger = _Debugger(settings, rank, hostname, channel)
    if os.environ.get("PYTHONBREAKPOINT", "") in ("", "pdb.set_trace"):
        sys.breakpointhook = _breakpoint
    pdb.set_trace = _set_trace


def _breakpoint(*_args: Any, **_kwargs: Any) -> None:
    if _debugger is not None:
        _debugger.set_trace(sys._getframe(1))  # noqa: SLF001 -- the caller of breakpoint()


def _set_trace(*, header: str | None = None) -> None:
    if _debugger is not None:
        _debugger.set_trace(sys._getframe(1), header)  # noqa: SLF001 -- pdb.set_trace's caller


def post_mortem(error: BaseException) -> None:
    """With ``post_mortem`` on: a session where ``error`` was raised (returns when it ends)."""
    if _debugger is not None and _debugger.settings.post_mortem:
        _debugger.post_mortem(error)
