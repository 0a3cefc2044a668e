"""Worker and agent output in the launcher: live on the terminal and in one folder per run.

Every line becomes a :class:`logging.LogRecord` of logger ``torchrunx.<hostname>`` (agent) or
``torchrunx.<hostname>.<local_rank>`` (worker), with ``hostname``, ``local_rank`` and ``stream``
attributes, and goes to the run's handlers: by default rank 0's lines and the agents' warnings
on the terminal, and one file per agent and per worker under ``$TORCHRUNX_LOG_DIR``.
"""

from __future__ import annotations

__all__ = [
    "HandlerFactory",
    "LiveHandler",
    "RedirectHandler",
    "default_handlers",
    "file_handlers",
    "get_handler_filter",
    "log_level_from_env",
]

import datetime as dt
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

HandlerFactory = Callable[[], list[logging.Handler]]


def get_handler_filter(
    hostname: str, local_rank: int | None, log_level: int = logging.NOTSET
) -> Callable[[logging.LogRecord], bool]:
    """A filter admitting records of one agent (``local_rank=None``) or one worker."""
    return lambda record: (
        getattr(record, "hostname", None) == hostname
        and getattr(record, "local_rank", None) == local_rank
        and record.levelno >= log_level
    )


class RedirectHandler(logging.Handler):
    """Hands each record to the launcher's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        """Handle ``record`` with ``logging.getLogger(record.name)``."""
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class LiveHandler(logging.Handler):
    """Writes lines to the launcher's stdout or stderr (as the worker did), prefixed compactly."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` as ``[hostname:local_rank] message``."""
        local_rank = getattr(record, "local_rank", None)
        where = getattr(record, "hostname", "?") + ("" if local_rank is None else f":{local_rank}")
        stream = sys.stderr if getattr(record, "stream", "stderr") == "stderr" else sys.stdout
        try:
            stream.write(f"[{where}] {record.getMessage()}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- a closed terminal must not break the run
            self.handleError(record)


def log_level_from_env() -> int:
    """``$TORCHRUNX_LOG_LEVEL`` (default ``INFO``) as a level number."""
    value = os.environ.get("TORCHRUNX_LOG_LEVEL", "INFO")
    if value.isdigit():
        return int(value)
    if sys.version_info >= (3, 11):
        level = logging.getLevelNamesMapping().get(value.upper())
    else:  # 3.10 has no public name-to-level mapping
        level = logging._nameToLevel.get(value.upper())  # noqa: SLF001
    if level is None:
        names = "DEBUG, INFO, WARNING, ERROR, CRITICAL"
        msg = f"$TORCHRUNX_LOG_LEVEL={value!r} is not a level: use one of {names} or a number"
        raise ValueError(msg)
    return level


def _new_run_dir(root: Path) -> Path:
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d_%H-%M-%S.%f")
    for i in range(1000):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    msg = f"could not make a new log folder under {root}"
    raise FileExistsError(msg)


def file_handlers(
    hostnames: list[str],
    workers_per_host: list[int],
    log_dir: str | os.PathLike[str],
    log_level: int = logging.NOTSET,
) -> list[logging.Handler]:
    """One file per agent (``<hostname>.log``, with its local worker 0) and per worker.

    Files go into a new folder under ``log_dir`` named by the time of the run's start.
    """
    folder = _new_run_dir(Path(log_dir))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    for hostname, workers in zip(hostnames, workers_per_host, strict=False):
        agent = logging.FileHandler(folder / f"{hostname}.log", delay=True)
        worker0 = get_handler_filter(hostname, 0, log_level)
        agent_own = get_handler_filter(hostname, None, log_level)
        agent.addFilter(lambda r, a=agent_own, w=worker0: a(r) or w(r))  # type: ignore[misc]
        handlers.append(agent)
        for local_rank in range(workers):
            worker = logging.FileHandler(folder / f"{hostname}[{local_rank}].log", delay=True)
            worker.addFilter(get_handler_filter(hostname, local_rank, log_level))
            handlers.append(worker)
    for h in handlers:
        h.setFormatter(formatter)
    return handlers


def default_handlers(
    hostnames: list[str], workers_per_host: list[int], log_dir: str | os.PathLike[str] | None
) -> list[logging.Handler]:
    """Rank 0's output and the agents' warnings live, and files unless ``log_dir`` is ``""``."""
    live = LiveHandler()
    worker0 = get_handler_filter(hostnames[0], 0)
    live.addFilter(
        lambda r: worker0(r) or (getattr(r, "local_rank", 0) is None and r.levelno >= 30)
    )
    handlers: list[logging.Handler] = [live]
    if log_dir is None:
        log_dir = os.environ.get("TORCHRUNX_LOG_DIR", "torchrunx_logs")
    if str(log_dir) != "":
        handlers += file_handlers(hostnames, workers_per_host, log_dir, log_level_from_env())
    return handlers
