"""Command-line options for every ``Launcher`` field, and the launcher they describe.

::

    parser = argparse.ArgumentParser()
    add_torchrunx_argument_group(parser)
    launcher = launcher_from_args(parser.parse_args())

The one source of the options: each field's type says how it is written on a command line (a
number, words, ``NAME=VALUE`` pairs, ...) and its docstring is its help, so a new field has its
option without anyone writing it. The ``torchrunx`` command (``torchrunx.command``) and this
group are the same options. (With tyro, ``tyro.cli(torchrunx.Launcher)`` reads the same
docstrings.)
"""

from __future__ import annotations

__all__ = ["add_torchrunx_argument_group", "field_help", "launcher_from_args"]

import argparse
import ast
import builtins
import dataclasses
import inspect
import itertools
import re
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torchrunx
from torchrunx.launcher import Launcher

Convert = typing.Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class _Option:
    """How one field is written on a command line."""

    kwargs: dict[str, Any]
    convert: Convert | None = None  # from what argparse parsed to the field's value

    def value(self, parsed: Any) -> Any:
        """The field's value of what argparse parsed."""
        return parsed if self.convert is None else self.convert(parsed)


@cache
def field_help() -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), as plain text."""
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
            docs[node.target.id] = plain(following.value.value)
    return docs


def plain(text: str) -> str:
    """Docstring markup as plain text: ``x`` and ``B`` become x and B, on one line."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def fields() -> list[dataclasses.Field[Any]]:
    """The fields a command line sets: every ``Launcher`` field its constructor takes."""
    return [f for f in dataclasses.fields(Launcher) if f.init]


def add_torchrunx_argument_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--hostnames``, ``--workers-per-host``, … (one option per Launcher field)."""
    docs = field_help()
    group = parser.add_argument_group("torchrunx", "Where and how to run (torchrunx.Launcher).")
    for f in fields():
        option = _option_of(f.name)
        shown = _shown(f.default)
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"torchrunx_{f.name}",
            default=argparse.SUPPRESS,  # unset: the Launcher's own default
            help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"),
            **option.kwargs,
        )
    return group


def launcher_from_args(args: argparse.Namespace, **overrides: Any) -> Launcher:
    """The ``Launcher`` the options describe; bad values raise as the Launcher does."""
    values = dict(overrides)
    for f in fields():
        dest = f"torchrunx_{f.name}"
        if hasattr(args, dest):
            values[f.name] = _option_of(f.name).value(getattr(args, dest))
    return Launcher(**values)


@cache
def _option_of(name: str) -> _Option:
    """The option of field ``name``, from its type."""
    hint = typing.get_type_hints(Launcher)[name]
    parts = set(typing.get_args(hint)) if _is_union(hint) else {hint}
    words = tuple(w for p in parts if typing.get_origin(p) is Literal for w in typing.get_args(p))
    plain_parts = {p for p in parts if typing.get_origin(p) is not Literal}
    for matches, make in _KINDS:
        if matches(plain_parts):
            return make(words, type(None) in parts)
    msg = f"Launcher.{name}: no command-line form for {hint}: add one to torchrunx.integrations.cli"
    raise TypeError(msg)


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _shown(default: object) -> str:
    if isinstance(default, tuple):
        return " ".join(getattr(d, "__name__", str(d)) for d in default) or "none"
    return str(default)


# ---- the kinds of field


def _flag(_words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"action": argparse.BooleanOptionalAction})


def _number(kind: type) -> typing.Callable[[tuple[str, ...], bool], _Option]:
    metavar = "SECONDS" if kind is float else "N"
    return lambda _words, _none: _Option({"type": kind, "metavar": metavar})


def _text(_words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"metavar": "PATH"})


def _choice(words: tuple[str, ...], none: bool) -> _Option:
    choices = [*words, *(["None"] if none else [])]
    return _Option({"choices": choices}, lambda v: None if v == "None" else v)


def _words_or_list(words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"nargs": "+", "metavar": "HOST"}, lambda v: _one_word_or_list(v, words))


def _counts_or_words(words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"nargs": "+", "metavar": "N"}, lambda v: _counts(v, words))


def _strings(_words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"nargs": "*", "metavar": "NAME"}, tuple)


def _pairs(_words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"nargs": "*", "metavar": "NAME=VALUE"}, lambda v: _dict(v, "NAME=VALUE"))


def _path_or_bool(_words: tuple[str, ...], _none: bool) -> _Option:
    def convert(value: str) -> bool | str:
        lowered = value.lower()
        return lowered in ("true", "yes", "1") if lowered in _BOOLEAN_WORDS else value

    return _Option({"metavar": "PATH|true|false"}, convert)


def _path_or_pairs(_words: tuple[str, ...], _none: bool) -> _Option:
    def convert(value: list[str]) -> str | dict[str, str]:
        if len(value) == 1 and "=" not in value[0]:
            return value[0]
        return _dict(value, "HOST=PATH")

    return _Option({"nargs": "+", "metavar": "PATH|HOST=PATH"}, convert)


def _exception_types(_words: tuple[str, ...], _none: bool) -> _Option:
    return _Option({"nargs": "*", "metavar": "EXCEPTION"}, lambda v: tuple(map(_exception, v)))


_BOOLEAN_WORDS = ("true", "false", "yes", "no", "1", "0")
_KINDS: list[tuple[typing.Callable[[set[Any]], bool], typing.Callable[..., _Option]]] = [
    (lambda p: p == {bool}, _flag),
    (lambda p: p == {int}, _number(int)),
    (lambda p: p == {float}, _number(float)),
    (lambda p: p <= {str, Path, type(None)} and str in p, _text),
    (lambda p: p <= {type(None)}, _choice),
    (lambda p: p == {list[str]}, _words_or_list),
    (lambda p: int in p and list[int] in p, _counts_or_words),
    (lambda p: p == {tuple[str, ...]}, _strings),
    (lambda p: dict[str, str] in p and str not in p, _pairs),
    (lambda p: p == {bool, str, Path}, _path_or_bool),
    (lambda p: p == {str, dict[str, str], type(None)}, _path_or_pairs),
    (lambda p: p == {tuple[type[BaseException], ...]}, _exception_types),
]


# ---- conversions


def _dict(items: list[str], form: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (_, eq, _) in zip(items, pairs, strict=True) if not eq]
    if bad:
        msg = f"{bad}: write each as {form}"
        raise ValueError(msg)
    return {name: value for name, _, value in pairs}


def _exception(name: str) -> type[BaseException]:
    found = getattr(torchrunx, name, None) or getattr(builtins, name, None)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    msg = f"{name!r} is not an exception of torchrunx or a builtin one (e.g. WorkerFailedError)"
    raise ValueError(msg)


def _one_word_or_list(value: Any, words: tuple[str, ...]) -> Any:
    if isinstance(value, list) and len(value) == 1 and value[0] in words:
        return value[0]
    return value


def _counts(value: Any, words: tuple[str, ...]) -> Any:
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
