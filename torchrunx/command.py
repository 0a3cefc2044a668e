"""The ``torchrunx`` command: a script (or ``-m module``) on every rank, as ``torchrun`` runs one.

::

    torchrunx [--hostnames H ...] [--workers-per-host N] [--backend B] ... script.py [args ...]
    torchrunx [options] -m module [args ...]
    torchrunx [options] -- script [args ...]     (a script whose name does not end in .py)

Every ``Launcher`` field is an option (``torchrunx.integrations.cli``). The script runs as
``__main__`` on every rank with its own ``sys.argv``; no process group is made unless
``--backend`` asks for one (a torchrun script calls ``init_process_group`` itself, reading
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` as usual). Output, logs, failure
reports, stacks, the debugger, preemption and restarts are those of any run. The exit status is
0 when every rank's script ended with 0; else the first failing rank's, or 1 with the report on
stderr.
"""

from __future__ import annotations

__all__ = ["main", "run_script"]

import argparse
import runpy
import sys
import traceback
from pathlib import Path

from .integrations.cli import add_torchrunx_argument_group, launcher_from_args

_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C


def run_script(target: str, module: bool, args: list[str]) -> int:
    """On a rank: ``target`` as ``__main__`` (a module with ``module``), with ``args``.

    Returns its exit status: 0 when it returns, else what its ``sys.exit`` said.
    """
    sys.argv = [target, *args]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target).resolve().parent))  # as python does
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return _status(e.code)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``torchrunx ...``: run the script on every rank; the exit status to leave with."""
    argv = sys.argv[1:] if argv is None else argv
    ours, target = _split(argv)
    parser = _parser()
    options = parser.parse_args(ours)
    if target is None:
        parser.error("name a script (script.py, or -m module, or -- script) to run on every rank")
    module, script, args = target
    try:
        launcher = launcher_from_args(options, backend=None)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    try:
        with launcher:
            statuses = launcher.run(run_script, script, module, args).by_rank()
    except KeyboardInterrupt:
        return _INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- reported as the command's failure
        _report(e)
        return 1
    failed = [(rank, status) for rank, status in enumerate(statuses) if status]
    if failed:
        rank, status = failed[0]
        sys.stderr.write(f"torchrunx: rank {rank} exited with status {status}\n")
        return status
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrunx",
        usage="torchrunx [options] script.py [args ...] | -m module [args ...] | -- script ...",
        description=(
            "Run a script on every rank of one PyTorch distributed job, on this host or many, "
            "as torchrun does; failures come back as reports, with every rank's stack."
        ),
        epilog=(
            "The options end at the script: the first word ending in .py, -m, or --. No process "
            "group is made unless --backend names one: the script makes its own from RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as under torchrun."
        ),
    )
    add_torchrunx_argument_group(parser)
    return parser


def _split(argv: list[str]) -> tuple[list[str], tuple[bool, str, list[str]] | None]:
    """Our options, and the script's part: (a module?, its name, its arguments)."""
    for i, word in enumerate(argv):
        if word == "--":
            rest = argv[i + 1 :]
            return argv[:i], (False, rest[0], rest[1:]) if rest else None
        if word == "-m":
            rest = argv[i + 1 :]
            return argv[:i], (True, rest[0], rest[1:]) if rest else None
        if word.endswith(".py") and not word.startswith("-"):
            return argv[:i], (False, word, argv[i + 1 :])
    return argv, None


def _report(error: BaseException) -> None:
    """The failure as the user reads it: the rank's traceback (in their files), then what."""
    cause = error.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":
        sys.stderr.write(f"{cause}\n")
    sys.stderr.write("".join(traceback.format_exception_only(type(error), error)))
    if sys.version_info < (3, 11):  # which prints no notes of its own
        sys.stderr.write("".join(f"{note}\n" for note in getattr(error, "__notes__", [])))


def _status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")  # sys.exit("message"), as python prints it
    return 1
