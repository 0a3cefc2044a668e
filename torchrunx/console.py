"""The launcher's terminal for the ranks' debugger sessions: one at a time, in the order they came.

::

    controller thread ── debug {text, state} ──► Console ──► stdout: the session's output
                                                   │  ◄── stdin: a line (polled, never blocking)
    agent ◄── debug-input {line} ◄── controller ◄──┘

A thread of its own serves the sessions, whatever the user's threads do. It reads stdin only while
the session in front waits for a line, and in short polls: a session whose run has ended is let go
at once, and no read outlives it. A line typed ahead (pasted) waits for the next prompt.
"""

from __future__ import annotations

__all__ = ["Console", "shared"]

import contextlib
import functools
import os
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from .line_editor import LineEditor
from .transport.messages import Debug, DebugInput

POLL_S = 0.1
"""How often a wait for a line looks whether its session is still there."""
COMPLETE_S = 2.0
"""How long Tab waits for the rank's completions (a rank busy elsewhere offers none)."""
IDLE_S = 5.0
"""The console's thread ends after this long without a session (it starts again with the next)."""


@dataclass
class _Session:
    """One rank's stop: from its first output until ``c``, ``q``, or its run's end."""

    run: str
    rank: int
    local_rank: int
    hostname: str
    why: str
    finished: threading.Event  # the run's end: nothing more will come
    reply: Callable[[DebugInput], None]
    text: list[str] = field(default_factory=list)
    waiting: bool = False  # pdb waits for a line
    over: bool = False
    quit: str = ""  # how the run was quit from here, if it was
    announced: bool = False
    completions: list[str] | None = None  # the rank's answer to the last Tab


class Console:
    """Serves debugger sessions on ``stdin``/``stdout`` (the launcher's terminal)."""

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self._stdin = stdin
        self._stdout = stdout
        self._sessions: list[_Session] = []  # in the order they came
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._typed = b""  # read from stdin, not yet handed to a prompt
        self._front: _Session | None = None
        self._editor: LineEditor | None = None  # made at the first prompt, on a real terminal
        self._editor_checked = False

    def on_debug(
        self,
        hostname: str,
        message: Debug,
        finished: threading.Event,
        reply: Callable[[DebugInput], None],
    ) -> None:
        """A rank's debugger said something (the controller's thread)."""
        with self._changed:
            session = next(
                (
                    s
                    for s in self._sessions
                    if (s.run, s.rank) == (message.run, message.rank) and not s.over
                ),
                None,
            )
            if session is None:  # a new stop (the rank's last session may not be shown yet)
                session = _Session(
                    message.run, message.rank, message.local_rank, hostname, message.why,
                    finished, reply,
                )  # fmt: skip
                self._sessions.append(session)
            if message.state == "completions":  # pdb still waits for its line
                session.completions = message.text.split("\n") if message.text else []
                self._changed.notify_all()
                return
            if message.state == "quit":
                session.quit = message.text
            else:
                session.text.append(message.text)
            session.waiting = message.state == "prompt"
            session.over = message.state in ("over", "quit")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="torchrunx-console", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def quit_at_prompt(self, run: str) -> bool:
        """Ctrl-C in the launcher: if a session of ``run`` has the terminal, it quits the run."""
        with self._changed:
            front = self._front
        if front is None or front.run != run or front.over or front.finished.is_set():
            return False
        front.reply(DebugInput(front.run, front.local_rank, None, "Ctrl-C at the prompt"))
        return True

    # ---- the console's thread

    def _serve(self) -> None:
        editing = self._line_editor() is not None
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._sessions), IDLE_S)
                if not self._sessions:
                    self._thread = None
                    return
                front = self._front = self._sessions[0]
                waiting = len(self._sessions) - 1
                # what it said and what it does now, taken together: nothing slips between
                text, front.text = "".join(front.text), []
                over, wants_line = front.over or front.finished.is_set(), front.waiting
                prompt = ""
                if editing and not over:  # readline shows the prompt (pdb's unfinished line)
                    text, prompt = _last_line(text)
                    if not wants_line:  # its prompt may come first, as output: it waits
                        front.text, prompt = [prompt] if prompt else [], ""
            self._show(front, text, waiting)
            if over:
                self._end(front)
            elif wants_line:
                self._answer(front, self._editor if editing else None, prompt)
            else:
                with self._changed:
                    self._changed.wait(POLL_S)

    def _show(self, session: _Session, text: str, waiting: int) -> None:
        if not session.announced:
            session.announced = True
            more = f"; {waiting} more waiting" if waiting else ""
            text = (
                f"\n*** torchrunx: rank {session.rank} @ {session.hostname} stopped: "
                f"{session.why}{more} ***\n{text}"
            )
        if text:
            self._write(text)

    def _end(self, session: _Session) -> None:
        with self._changed:
            self._sessions.remove(session)
            self._front = None
        if session.quit:
            self._write(f"\n*** torchrunx: run quit ({session.quit}): tearing it down ***\n")
        elif session.finished.is_set() and not session.over:
            self._write(
                f"\n*** torchrunx: rank {session.rank}'s session ended: its run is over ***\n"
            )

    def _line_editor(self) -> LineEditor | None:
        """readline, on the process's own terminal only (not on streams given to the console)."""
        if not self._editor_checked:
            self._editor_checked = True
            mine = self._stdin is None and self._stdout is None
            self._editor = LineEditor.here() if mine else None
        return self._editor

    def _answer(self, session: _Session, editor: LineEditor | None, prompt: str) -> None:
        """Read a line for ``session`` and send it; give up if its run ends meanwhile."""
        if editor is None:
            line = self._read_line(session)
        else:
            complete = functools.partial(self._complete, session)
            line = editor.read(prompt, complete, session.finished.is_set, POLL_S)
        if session.finished.is_set():
            return
        with self._changed:
            session.waiting = False
        why = "" if line is not None else "end of input at the prompt"
        session.reply(DebugInput(session.run, session.local_rank, line, why))

    def _complete(self, session: _Session, line: str, begin: int) -> list[str]:
        """Tab at ``session``'s prompt: what its rank offers for the word at ``begin``."""
        with self._changed:
            session.completions = None
        session.reply(DebugInput(session.run, session.local_rank, line, complete=begin))
        with self._changed:
            self._changed.wait_for(
                lambda: session.completions is not None or session.finished.is_set(), COMPLETE_S
            )
            return session.completions or []

    def _read_line(self, session: _Session) -> str | None:
        """The next line typed; ``None`` at the end of input (Ctrl-D)."""
        stdin = self._stdin or sys.stdin
        fd = stdin.fileno()
        while b"\n" not in self._typed:
            if session.finished.is_set():
                return ""
            readable, _, _ = select.select([fd], [], [], POLL_S)
            if not readable:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:  # end of input: what was typed before it is the last line
                line, self._typed = self._typed, b""
                return line.decode(errors="replace") + "\n" if line else None
            self._typed += data
        line, _, self._typed = self._typed.partition(b"\n")
        return line.decode(errors="replace") + "\n"

    def _write(self, text: str) -> None:
        stdout = self._stdout or sys.stdout
        with contextlib.suppress(OSError, ValueError):  # a closed terminal: nothing to show on
            stdout.write(text)
            stdout.flush()


def _last_line(text: str) -> tuple[str, str]:
    """``text`` up to its last newline (included), and what follows it."""
    done, newline, rest = text.rpartition("\n")
    return done + newline, rest


_shared: Console | None = None
_shared_lock = threading.Lock()


def shared() -> Console:
    """The console of this process: there is one terminal, whatever the launchers."""
    global _shared  # noqa: PLW0603 -- one per process, made at the first session
    with _shared_lock:
        if _shared is None:
            _shared = Console()
        return _shared
