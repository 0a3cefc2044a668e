"""Run a function on many processes across many machines as one PyTorch distributed job."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .environment import DEFAULT_ENV_VARS_FOR_COPY
    from .errors import (
        AgentFailedError,
        DebuggerQuitError,
        NotRunError,
        PreemptedError,
        WorkerFailedError,
    )
    from .launcher import Launcher, LauncherView, launch
    from .preemption import preempted
    from .result import LaunchResult
    from .runs import RunHandle
    from .sweep import Sweep
    from .transport.messages import RankStatus

__version__ = "0.5.0"

__all__ = [
    "DEFAULT_ENV_VARS_FOR_COPY",
    "AgentFailedError",
    "DebuggerQuitError",
    "LaunchResult",
    "Launcher",
    "LauncherView",
    "NotRunError",
    "PreemptedError",
    "RankStatus",
    "RunHandle",
    "Sweep",
    "WorkerFailedError",
    "__version__",
    "launch",
    "preempted",
]

# where each public name lives: imported at first use, so that processes which need only a part
# of the package (an agent, a host receiving sync_dir) do not pay for the launcher's imports
_HOMES = {
    "DEFAULT_ENV_VARS_FOR_COPY": "environment",
    "AgentFailedError": "errors",
    "DebuggerQuitError": "errors",
    "NotRunError": "errors",
    "PreemptedError": "errors",
    "WorkerFailedError": "errors",
    "Launcher": "launcher",
    "LauncherView": "launcher",
    "launch": "launcher",
    "preempted": "preemption",
    "LaunchResult": "result",
    "RunHandle": "runs",
    "Sweep": "sweep",
    "RankStatus": "transport.messages",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        msg = f"module 'torchrunx' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # once: later lookups are plain
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
