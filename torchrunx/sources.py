"""Whose file is this: ours, an installed library's, or the user's; and a copy's, renamed.

A frame or a module's file is one of three kinds::

    ours        this package, and how Python starts a module (<frozen runpy>)
    installed   the standard library and installed packages (this one's too)
    the user's  anything else: their script, their project

A host's copy of ``sync_dir`` holds the user's files under another path:
``in_launchers_terms()`` names them as the launcher has them, in a traceback or a stack dump.
Standard library only: every process (worker, agent, launcher) may import this.
"""

from __future__ import annotations

__all__ = [
    "LIBRARIES",
    "PACKAGE",
    "in_launchers_terms",
    "is_installed",
    "is_ours",
    "is_users",
]

import os
import sysconfig
from pathlib import Path

PACKAGE = str(Path(__file__).parent)
"""This package's folder."""
LIBRARIES = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
"""The folders of the standard library and of installed packages."""


def is_ours(path: str) -> bool:
    """A file of this package, or of how Python starts a module (``<frozen runpy>``)."""
    return path.startswith((PACKAGE + os.sep, "<frozen runpy"))


def is_installed(path: str) -> bool:
    """A file of the standard library or of an installed package (this one's too)."""
    return path.startswith(LIBRARIES)


def is_users(path: str) -> bool:
    """Neither ours nor a library's, nor frozen: a file of the user's."""
    return not path.startswith((PACKAGE, *LIBRARIES)) and not path.startswith("<frozen")


def in_launchers_terms(text: str, copy: str, copied_from: str) -> str:
    """A traceback or stack dump, with the files of a host's copy of ``sync_dir`` renamed.

    They are named as the launcher has them (``copied_from``, instead of ``copy``): the same
    contents, and the files the user edits and opens.
    """
    if not copy:
        return text
    return text.replace(f'File "{copy}/', f'File "{copied_from}/')
