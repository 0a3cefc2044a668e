"""Which environment variables reach agents and workers, and ``env_file`` sourcing.

Order: variables of the launcher matching ``copy_env_vars``, then ``extra_env_vars``, then what
``env_file`` sets when a shell sources it on the agent's host.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ENV_VARS_FOR_COPY", "agent_base_env", "copied_env", "source_env_file"]

import fnmatch
import functools
import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

DEFAULT_ENV_VARS_FOR_COPY: tuple[str, ...] = (
    "PATH",
    "LD_LIBRARY*",
    "LIBRARY_PATH",
    "PYTHON*",
    "CUDA*",
    "TORCH*",
    "PYTORCH*",
    "NCCL*",
)
"""Patterns (fnmatch) of launcher variables copied to agents and workers by default."""

_LOGIN_BASICS = (
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TERM",
    "TZ",
    "TMPDIR",
)
_SHELL_OWN = {"_", "SHLVL", "PWD", "OLDPWD"}
ENV_FILE_TIMEOUT_S = 60.0
"""Longest time an ``env_file`` may take to source."""


def copied_env(patterns: Iterable[str], extra: Mapping[str, str] | None) -> dict[str, str]:
    """Launcher variables matching ``patterns``, then ``extra`` on top."""
    matches = _matcher(tuple(patterns))
    env = {k: v for k, v in os.environ.items() if matches(k)}
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled test for all of ``patterns`` (fnmatch's, case-sensitive): every run asks."""
    either = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)"
    return re.compile(either).match


def agent_base_env(copied: Mapping[str, str]) -> dict[str, str]:
    """What an agent starts with: the login basics, then the copied and extra variables."""
    return {**copied_env(_LOGIN_BASICS, None), **copied}


def source_env_file(path: str) -> dict[str, str]:
    """Variables that ``path`` sets or changes when a shell sources it here.

    Raises ``RuntimeError`` naming the file and the shell's message when sourcing fails.
    """
    shell = shutil.which("bash") or "/bin/sh"
    script = 'set -ae; . "$0" >&2; exec env -0'  # -e: a command that fails fails the file
    try:
        out = subprocess.run(
            [shell, "-c", script, path],
            capture_output=True,
            check=False,
            timeout=ENV_FILE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        msg = f"sourcing env_file {path!r} took longer than {ENV_FILE_TIMEOUT_S} s"
        raise RuntimeError(msg) from None
    if out.returncode != 0:
        message = out.stderr.decode(errors="replace").strip() or f"exit code {out.returncode}"
        msg = f"sourcing env_file {path!r} with {shell} failed: {message}"
        raise RuntimeError(msg)
    after = dict(entry.split("=", 1) for entry in out.stdout.decode().split("\0") if "=" in entry)
    return {k: v for k, v in after.items() if k not in _SHELL_OWN and os.environ.get(k) != v}
