"""Run a function on many processes across many machines as one PyTorch distributed job."""

from .environment import DEFAULT_ENV_VARS_FOR_COPY
from .errors import AgentFailedError, DebuggerQuitError, WorkerFailedError
from .launcher import Launcher, LauncherView, launch
from .result import LaunchResult
from .runs import RunHandle
from .transport.messages import RankStatus

__version__ = "0.5.0"

__all__ = [
    "DEFAULT_ENV_VARS_FOR_COPY",
    "AgentFailedError",
    "DebuggerQuitError",
    "LaunchResult",
    "Launcher",
    "LauncherView",
    "RankStatus",
    "RunHandle",
    "WorkerFailedError",
    "__version__",
    "launch",
]
