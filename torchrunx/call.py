"""The call a run makes, checked in the launcher before any agent or worker starts.

::

    run(fn, *args, **kwargs) ─► the older form run(fn, {...}) read as keywords
                              ─► bound to fn's signature: a TypeError here, naming fn
                              ─► pickled once (zero-copy buffers): what cannot be is named

A wrong argument is the user's mistake, found in microseconds here rather than by every
worker after a start of seconds; an argument that cannot be pickled is named with its type.
"""

from __future__ import annotations

__all__ = ["pickled_call"]

import inspect
from typing import TYPE_CHECKING, Any

from .transport import serialization

if TYPE_CHECKING:
    from collections.abc import Callable

_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL,
)


def pickled_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """``(func, args, kwargs)`` pickled, once they are known to fit ``func``'s signature.

    Raises ``TypeError`` naming ``func`` and what does not fit, or naming the argument that
    cannot be pickled.
    """
    if not callable(func):
        msg = f"run() needs a callable, got {func!r} ({type(func).__name__})"
        raise TypeError(msg)
    signature = _signature(func)
    args, kwargs = _legacy_kwargs(signature, args, kwargs)
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            msg = f"{_name(func)}{_bare(signature)} cannot be called with these arguments: {e}"
            raise TypeError(msg) from None
    try:
        return serialization.dumps((func, args, kwargs))
    except Exception as e:
        raise TypeError(_unpicklable(func, args, kwargs, e)) from e


def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without one: the worker will tell
        return None


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """The signature without its annotations (strings, under ``from __future__ import ...``)."""
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters, return_annotation=empty)


def _legacy_kwargs(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``run(fn, {...})`` of older releases: a kwargs dict for a function with no positionals."""
    if signature is None or len(args) != 1 or kwargs or not isinstance(args[0], dict):
        return args, kwargs
    if any(p.kind in _POSITIONAL for p in signature.parameters.values()):
        return args, kwargs
    return (), dict(args[0])


def _unpicklable(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> str:
    """What of the call cannot be pickled, in words."""
    parts: list[tuple[str, Any]] = [("the function", func)]
    parts += [(f"positional argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for what, value in parts:
        why = _why_unpicklable(value)
        if why is not None:
            return (
                f"{what} of {_name(func)}, a {type(value).__name__}, cannot be pickled to reach "
                f"the workers: {why}"
            )
    return f"the call of {_name(func)} cannot be pickled: {type(error).__name__}: {error}"


def _why_unpicklable(value: object) -> str | None:
    try:
        serialization.dumps(value)
    except Exception as e:  # noqa: BLE001 -- any error of pickling: say which
        return f"{type(e).__name__}: {e}"
    return None


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
