"""argparse options for every :class:`~torchrunx.Launcher` field, and the launcher they describe.

::

    parser = argparse.ArgumentParser()
    add_torchrunx_argument_group(parser)
    launcher = launcher_from_args(parser.parse_args())

(With tyro, ``tyro.cli(torchrunx.Launcher)`` needs nothing from here.)
"""

from __future__ import annotations

__all__ = ["add_torchrunx_argument_group", "launcher_from_args"]

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
from functools import cache
from typing import Any

from torchrunx.launcher import Launcher


@cache
def field_help() -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Launcher)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split()).replace("``", "")
            docs[node.target.id] = text.replace("%", "%%")  # argparse formats help with %
    return docs


def add_torchrunx_argument_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--hostnames``, ``--workers-per-host``, … (one option per Launcher field)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Launcher) if f.init}
    docs = field_help()
    group = parser.add_argument_group("torchrunx", "Where and how to run (torchrunx.Launcher).")

    def option(name: str, **kwargs: Any) -> None:
        default = defaults[name]
        shown = " ".join(default) if isinstance(default, tuple) else default
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"torchrunx_{name}",
            default=default,
            help=f"{docs.get(name, '')} (default: {shown})",
            **kwargs,
        )

    option("hostnames", nargs="+", metavar="HOST")
    option("workers_per_host", nargs="+", metavar="N")
    option("ssh_config_file", metavar="FILE")
    option("backend", choices=["nccl", "gloo", "mpi", "ucc", "auto", "None"])
    option("worker_timeout", type=int, metavar="SECONDS")
    option("agent_timeout", type=int, metavar="SECONDS")
    option("copy_env_vars", nargs="*", metavar="PATTERN")
    option("extra_env_vars", nargs="*", metavar="NAME=VALUE")
    option("env_file", metavar="FILE")
    option("log_dir", metavar="DIR")
    option("agent_start", choices=["auto", "ssh", "srun"])
    option("encrypt", action=argparse.BooleanOptionalAction)
    option("live_ranks", nargs="+", metavar="RANK")
    return group


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    """The :class:`Launcher` the options describe; bad values raise as the Launcher does."""

    def get(name: str) -> Any:
        return getattr(args, f"torchrunx_{name}")

    extra = get("extra_env_vars")
    if extra is not None and not isinstance(extra, dict):
        pairs = [item.partition("=") for item in extra]
        bad = [item for item, (_, eq, _) in zip(extra, pairs, strict=True) if not eq]
        if bad:
            msg = f"--extra-env-vars {bad}: write each as NAME=VALUE"
            raise ValueError(msg)
        extra = {name: value for name, _, value in pairs}
    backend = get("backend")
    return Launcher(
        hostnames=_one_word_or_list(get("hostnames"), ("auto", "slurm")),
        workers_per_host=_counts(get("workers_per_host")),
        ssh_config_file=get("ssh_config_file"),
        backend=None if backend == "None" else backend,
        worker_timeout=get("worker_timeout"),
        agent_timeout=get("agent_timeout"),
        copy_env_vars=tuple(get("copy_env_vars")),
        extra_env_vars=extra,
        env_file=get("env_file"),
        log_dir=get("log_dir"),
        agent_start=get("agent_start"),
        encrypt=get("encrypt"),
        live_ranks=_counts(get("live_ranks"), words=("all",)),
    )


def _one_word_or_list(value: Any, words: tuple[str, ...]) -> Any:
    if isinstance(value, list) and len(value) == 1 and value[0] in words:
        return value[0]
    return value


def _counts(value: Any, words: tuple[str, ...] = ("cpu", "gpu", "auto")) -> Any:
    """``["2"]`` -> 2, ``["2", "1"]`` -> [2, 1], ``["gpu"]`` -> "gpu"; else as given."""
    if not isinstance(value, list):
        return value
    value = _one_word_or_list(value, words)
    if isinstance(value, str):
        return value
    try:
        numbers = [int(v) for v in value]
    except ValueError:
        msg = f"{' '.join(value)!r}: give whole numbers, or one of {words}"
        raise ValueError(msg) from None
    return numbers[0] if len(numbers) == 1 else numbers
