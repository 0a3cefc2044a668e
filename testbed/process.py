"""Processes of this machine for the testbed: bounded commands, and what ``/proc`` says of a pid.

:func:`run_command` is the one way the testbed runs a command to completion: it always has a time
limit, kills everything the command started when that passes, and its errors name the command,
its exit status and its output.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

COMMAND_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0  # for a SIGKILLed process to be reaped, or its pipes to close
OUTPUT_TAIL = 3000  # characters of each output stream quoted in an error
KILL_ROUNDS = 5  # a process may fork while its session is being killed: look again


class CommandError(RuntimeError):
    """A command exited with a failure status or ran past its time limit."""


def run_command(  # noqa: PLR0913 -- keyword-only options of one subprocess
    argv: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT_S,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: str | None = None,
    error: Callable[[str], Exception] = CommandError,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, for at most ``timeout`` s; return its status and its output.

    The command runs in a session of its own with ``stdin`` as its input (none if None), so that
    on timeout (or an interrupt of this process) everything it started is killed with it, process
    groups of its own included (``salloc`` makes one for its command).

    Raises:
        error: (built from the message) the command ran past ``timeout``, whatever ``check``;
            with ``check``, it exited with a non-zero status.
    """
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = _drain(proc)
        msg = f"{shlex.join(argv)} did not finish in {timeout:g} s (killed)\n{_output(out, err)}"
        raise error(msg) from None
    finally:
        reap(proc, session=True)
    if check and proc.returncode != 0:
        given = f"\nstdin:\n{stdin[-OUTPUT_TAIL:]}" if stdin else ""
        msg = f"{shlex.join(argv)} exited with {proc.returncode}\n{_output(out, err)}{given}"
        raise error(msg)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _drain(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The output of a killed command; none where a process that left its session holds a pipe."""
    try:
        return proc.communicate(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        return "", ""


def _output(out: str, err: str) -> str:
    parts = [
        f"{name}:\n{text.strip()[-OUTPUT_TAIL:]}"
        for name, text in (("stderr", err), ("stdout", out))
        if text.strip()
    ]
    return "\n".join(parts) if parts else "(no output)"


def reap(proc: subprocess.Popen[str] | subprocess.Popen[bytes], session: bool = False) -> None:
    """SIGKILL ``proc`` if it still runs (with its whole session if asked), then reap it.

    The wait is bounded by ``KILL_WAIT_S``: a process stuck in the kernel stays a zombie rather
    than hang the caller.
    """
    if proc.poll() is None:
        if session:
            kill_session(proc.pid)
        else:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_WAIT_S)


# ---- /proc -------------------------------------------------------------------------------------


def all_pids() -> list[int]:
    """Every process of this machine (as far as this process's pid namespace sees)."""
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first); None once it is gone.

    Split after the last ``)``: the command name itself may hold spaces and parentheses.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks: with the pid, it identifies a process despite reuse."""
    fields = stat_fields(pid)
    return None if fields is None else fields[19]


def cmdline(pid: int) -> str:
    """Command line of ``pid``, arguments joined by spaces (empty once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def comm(pid: int) -> str:
    """Program name of ``pid`` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def ns_id(pid: int, kind: str) -> tuple[int, int] | None:
    """Identity of the ``kind`` namespace (``net``, ``mnt``, ...) of ``pid``; None once gone."""
    try:
        st = Path(f"/proc/{pid}/ns/{kind}").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL ``pids`` (those already gone aside); SIGKILL also ends stopped processes."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_session(sid: int) -> None:
    """SIGKILL every live process of session ``sid``, until none is left (``KILL_ROUNDS`` at most).

    Zombies are left to their parents: they run nothing, and only a parent can reap them.
    """
    for _ in range(KILL_ROUNDS):
        members = [
            pid
            for pid in all_pids()
            if (fields := stat_fields(pid)) and fields[3] == str(sid) and fields[0] != "Z"
        ]
        if not members:
            return
        kill_all(members)
        time.sleep(0.01)
