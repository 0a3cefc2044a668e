"""Preemption signals and the notice they become; ``preempted()``, as a rank reads it.

::

    a preemption signal ─► the launcher, an agent, or every process of a host
        └─► one notice for the whole launcher ─► every agent ─► a byte on each worker's
            stack channel ─► its listening thread (worker_stacks) ─► notice() ─► preempted()

No process dies of a preemption signal: the launcher's process takes it with
``LauncherSignals``, the agent and the forkserver with handlers of their own, each worker
with ``take_signals()``. A rank's notice is a flag set once, by a message or by the signal
itself, never polled over the network: calling ``preempted()`` every step costs a function
call. Ranks learn of the notice at slightly
different moments; ``preempted(agree=True)`` is the collective that makes every rank of the
default process group stop at the same step.
"""

from __future__ import annotations

__all__ = ["UNFIT", "LauncherSignals", "notice", "preempted", "signal_numbers", "take_signals"]

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

UNFIT = ("SIGKILL", "SIGSTOP", "SIGINT", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
"""Signals that cannot be a notice: they cannot be caught, are Ctrl-C's, or mean a crash."""

_NOTICE = threading.Event()


def preempted(*, agree: bool = False) -> bool:
    """Whether a preemption notice has reached this process: stop at a checkpoint and return.

    In a worker: whether a preemption signal reached the launcher, one of its agents, or this
    rank's host (False outside a worker). The run then has ``Launcher.preempt_grace`` seconds
    to return, after which it is torn down; either way ``run()`` raises
    ``PreemptedError``.

    ``agree=True`` (in a worker, with a process group): whether the notice has reached *any*
    rank of the default process group, as an all-reduce of every rank's flag. It is a
    collective: every rank must call it at the same step (say, every 10 steps), and then every
    rank gets the same answer and stops at the same step.
    """
    if not agree:
        return _NOTICE.is_set()
    import torch  # noqa: PLC0415 -- only in workers, where it is loaded already
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        return _NOTICE.is_set()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    flag = torch.tensor([1 if _NOTICE.is_set() else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def notice() -> None:
    """This rank has had the notice (from its agent, or a preemption signal of its own)."""
    _NOTICE.set()


def signal_numbers(names: Iterable[str]) -> list[signal.Signals]:
    """The signals of ``names`` (``"SIGTERM"``); ``ValueError`` naming one that is not one."""
    names = list(names)
    unknown = [n for n in names if n not in signal.Signals.__members__]
    if unknown:
        msg = (
            f"preempt_signals: {unknown[0]!r} is not a signal's name (such as 'SIGTERM', 'SIGUSR1')"
        )
        raise ValueError(msg)
    return [signal.Signals[n] for n in names]


def take_signals(names: Iterable[str]) -> None:
    """In a worker: a preemption signal is this rank's notice; it does not end the process.

    Only this process's: a child it forks (a DataLoader's worker, a ``multiprocessing`` pool's)
    takes the signals as it would without torchrunx, so that ``terminate()`` still ends it.
    """
    numbers = signal_numbers(names)
    for number in numbers:
        signal.signal(number, _noticed)
    if numbers:
        os.register_at_fork(after_in_child=lambda: _default(numbers))


def _default(numbers: list[signal.Signals]) -> None:
    for number in numbers:
        signal.signal(number, signal.SIG_DFL)


def _noticed(_signum: int, _frame: object) -> None:
    _NOTICE.set()


class LauncherSignals:
    """Preemption signals to the launcher's process, handed to ``on_signal`` (their name).

    Installed while a launcher has agents, from the main thread only (Python runs handlers
    there); a handler that was there before is called after ours, and is put back by
    ``restore()``. Not installed from another thread: the agents still take the notice.
    """

    def __init__(self, names: Iterable[str], on_signal: Callable[[str], None]) -> None:
        self._on_signal = on_signal
        self._before: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for number in signal_numbers(names):
            self._before[number] = signal.signal(number, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._on_signal(signal.Signals(signum).name)
        before = self._before.get(signal.Signals(signum))
        if callable(before):
            before(signum, frame)

    def restore(self) -> None:
        """Put back the handlers of before, where ours is still the one installed."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; at interpreter exit it is
        for number, before in self._before.items():
            if signal.getsignal(number) == self._handle:
                signal.signal(number, before if before is not None else signal.SIG_DFL)
        self._before.clear()
