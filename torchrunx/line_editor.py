"""Line editing at a rank's prompt: readline's history, keys and Tab, on the console's own loop.

``input()`` would block until a line comes, but the console must let a session go the moment its
run ends. readline's callback interface takes one key at a time: the console waits for keys with
``select`` in short polls, as without readline, and hands each to readline. What Tab offers comes
from the rank (its frames hold the names), through the ``complete`` function given to ``read()``.

Only where plain ``input()`` would use readline: stdin and stdout both a terminal, and a readline
with the callback interface (GNU readline or libedit).
"""

from __future__ import annotations

__all__ = ["LineEditor"]

import contextlib
import ctypes
import os
import select
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_DELIMS = " \t\n`@#$%^&*()=+[{]}\\|;:'\",<>?"  # pdb's own: "x.y" and "a-b" stay one word


class LineEditor:
    """readline on the process's stdin and stdout, one line at a time."""

    def __init__(self, readline: ModuleType, library: ctypes.CDLL) -> None:
        self._readline = readline
        self._lib = library
        self._lib.rl_callback_handler_install.argtypes = [ctypes.c_char_p, _HANDLER]
        self._lib.rl_callback_handler_install.restype = None
        self._lib.rl_callback_read_char.restype = None
        self._lib.rl_callback_handler_remove.restype = None
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]

    @classmethod
    def here(cls) -> LineEditor | None:
        """The editor for this process's terminal; ``None`` where ``input()`` has none either."""
        try:
            if not (os.isatty(0) and os.isatty(1)) or sys.stdin.fileno() != 0:
                return None
            import readline  # noqa: PLC0415 -- only once a prompt needs it

            library = ctypes.CDLL(readline.__file__)  # its symbols: the very readline it uses
            library.rl_callback_handler_install  # noqa: B018 -- raises if the interface is missing
        except (ImportError, OSError, AttributeError, ValueError):
            return None
        return cls(readline, library)

    def read(
        self,
        prompt: str,
        complete: Callable[[str, int], list[str]],
        gone: Callable[[], bool],
        poll: float,
    ) -> str | None:
        """A line (with its newline) typed after ``prompt``.

        ``None`` at end of input (Ctrl-D); ``""`` once ``gone()`` (asked every ``poll`` s).
        """
        lines: list[str | None] = []

        def take(pointer: int | None) -> None:
            lines.append(
                None if not pointer else ctypes.string_at(pointer).decode("utf-8", "replace")
            )
            if pointer:
                self._free(pointer)
            self._lib.rl_callback_handler_remove()  # before its next key: the terminal is back

        handler = _HANDLER(take)  # referenced until the line is in: readline holds only a pointer
        saved = self._readline.get_completer(), self._readline.get_completer_delims()
        self._readline.set_completer(_Completer(self._readline, complete))
        self._readline.set_completer_delims(_DELIMS)
        self._readline.parse_and_bind("tab: complete")
        self._lib.rl_callback_handler_install(prompt.encode(), handler)
        try:
            return self._keys(lines, gone, poll)
        finally:
            if not lines:  # let go mid-line: the terminal as it was, the cursor on a new line
                self._lib.rl_callback_handler_remove()
                with contextlib.suppress(OSError):
                    os.write(1, b"\n")
            self._readline.set_completer(saved[0])
            self._readline.set_completer_delims(saved[1])

    def _keys(self, lines: list[str | None], gone: Callable[[], bool], poll: float) -> str | None:
        while not lines:
            if gone():
                return ""
            readable, _, _ = select.select([0], [], [], poll)
            if readable:
                self._lib.rl_callback_read_char()
        line = lines[0]
        if line is None:
            return None
        self._remember(line)
        return line + "\n"

    def _remember(self, line: str) -> None:
        """History as pdb's has it: each line typed, a repeat of the last one once."""
        readline = self._readline
        last = readline.get_history_item(readline.get_current_history_length())
        if line.strip() and line != last:
            readline.add_history(line)


class _Completer:
    """readline's completer: the rank's words for the word under the cursor, asked once per Tab."""

    def __init__(self, readline: ModuleType, complete: Callable[[str, int], list[str]]) -> None:
        self._readline = readline
        self._complete = complete
        self._words: list[str] = []

    def __call__(self, _text: str, state: int) -> str | None:
        if state == 0:
            line = self._readline.get_line_buffer()[: self._readline.get_endidx()]
            self._words = self._complete(line, self._readline.get_begidx())
        return self._words[state] if state < len(self._words) else None
