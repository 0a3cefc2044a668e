"""Worker and agent output in the launcher: live on the terminal and in one folder per run.

Every line becomes a ``logging.LogRecord`` of logger ``torchrunx.<hostname>`` (agent) or
``torchrunx.<hostname>.<local_rank>`` (worker), with ``hostname``, ``local_rank``, ``rank`` and
``stream`` attributes, and goes to the run's handlers: by default rank 0's lines and the agents'
warnings on the terminal, and one file per agent and per worker under ``$TORCHRUNX_LOG_DIR``.

A worker's ``logging`` records travel as lines of its stderr (``record_line()``), so they stay
in order with what it prints, and arrive with their own logger name and level.
"""

from __future__ import annotations

__all__ = [
    "HandlerFactory",
    "LiveHandler",
    "RedirectHandler",
    "RunFilesHandler",
    "default_handlers",
    "file_handlers",
    "get_handler_filter",
    "log_level_from_env",
    "output_records",
    "readable_line",
    "record_line",
]

import contextlib
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .transport.messages import Output

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
    """Writes to the launcher's stdout or stderr (as the worker did), prefixed ``[host:rank]``.

    Shows the workers of ``ranks`` (global ranks; ``None``: all) and agents' warnings. Lines are
    flushed once per batch (see ``emit_batch()``), not once per line. Lines that workers
    redraw with carriage returns (progress bars) stay at the bottom of a terminal, one line per
    rank, each redrawn in place under its prefix; finished lines are written above them.
    """

    takes_redraws = True

    def __init__(self, ranks: Iterable[int] | None = (0,), label: str = "") -> None:
        super().__init__()
        self.ranks = None if ranks is None else frozenset(ranks)
        self.label = label + " " if label else ""  # which run of a sweep, before the place
        self.bars: dict[str, str] = {}  # where -> its unfinished line, drawn at the bottom
        self.bar_stream: TextIO | None = None  # the terminal they are drawn on

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record``, each of its lines prefixed with where it came from."""
        target = self._target(
            getattr(record, "hostname", "?"),
            getattr(record, "local_rank", None),
            getattr(record, "rank", None),
            getattr(record, "stream", "stderr"),
            record.levelno,
        )
        if target is None:
            return
        stream, where = target
        lines = record.getMessage().split("\n")
        if getattr(record, "redraw", False):
            self._redraw(stream, where, lines[-1])
        else:
            self._finished(stream, where, "".join(f"[{where}] {line}\n" for line in lines))

    def handle_chunk(self, chunk: Chunk) -> None:
        """Write a plain chunk, each line prefixed (as ``emit()`` would, at C speed)."""
        c = chunk
        target = self._target(c.hostname, c.local_rank, c.rank, c.stream, c.levelno)
        if target is not None:
            stream, where = target
            self._finished(stream, where, chunk.text(f"[{where}] "))

    def _target(
        self, hostname: str, local_rank: int | None, rank: int | None, stream: str, level: int
    ) -> tuple[TextIO, str] | None:
        """Where output goes, and its prefix; None if it is not shown (not a live rank's)."""
        if local_rank is None:
            if level < logging.WARNING:
                return None
        elif self.ranks is not None and rank not in self.ranks:
            return None
        where = self.label + hostname + ("" if local_rank is None else f":{local_rank}")
        return (sys.stderr if stream == "stderr" else sys.stdout), where

    def _finished(self, stream: TextIO, where: str, text: str) -> None:
        """Finished lines go above the bars (``where``'s own bar ends with them)."""
        if not self.bars:
            self._write(stream, text)
            return
        bars = self.bar_stream or stream
        self._write(bars, self._erase_bars())
        with contextlib.suppress(Exception):  # before the lines, on whichever stream they go
            bars.flush()
        self.bars.pop(where, None)
        self._write(stream, text)
        with contextlib.suppress(Exception):
            stream.flush()
        self._write(bars, self._draw_bars())

    def _redraw(self, stream: TextIO, where: str, line: str) -> None:
        if not _is_terminal(stream):
            return  # a file or a pipe gets the line once, finished
        erase = self._erase_bars()
        self.bars[where] = line
        self.bar_stream = stream
        self._write(stream, erase + self._draw_bars())

    def _erase_bars(self) -> str:
        """From the end of the last bar: clear each bar's line, up to the first one's start."""
        return "\r\x1b[2K" + "\x1b[1A\x1b[2K" * (len(self.bars) - 1) if self.bars else ""

    def _draw_bars(self) -> str:
        """Every bar, one line each; the cursor stays at the end of the last one."""
        return "\n".join(f"[{where}] {line}" for where, line in self.bars.items())

    def _write(self, stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
        except UnicodeEncodeError:  # bytes that are not UTF-8, on a strict terminal
            stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 -- a closed terminal must not break the run
            self.handleError(logging.makeLogRecord({"msg": "live output"}))

    def flush(self) -> None:
        """Flush both streams."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed terminal must not break the run
                stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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
    """A new folder named by the local time, ISO 8601 to the microsecond.

    ``datetime.fromisoformat(name)`` gives the time back (naive, local, as
    ``datetime.now()``), as torchrunx 0.4's folders did. Two runs starting in the same
    microsecond take the next free microsecond, so every name stays a timestamp.
    """
    stamp = dt.datetime.now()  # noqa: DTZ005 -- naive local time, as 0.4 named its folders
    for _ in range(1000):
        path = root / stamp.isoformat(timespec="microseconds")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            stamp += dt.timedelta(microseconds=1)
            continue
        return path
    msg = f"could not make a new log folder under {root}"
    raise FileExistsError(msg)


def _file_line(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
    message = record.getMessage()
    return f"{stamp},{int(record.msecs):03d} {record.levelname} {record.name}: {message}\n"


def _open(path: Path) -> IO[str]:
    # surrogateescape: bytes that are not UTF-8 come out of the file as they went in
    return path.open("a", encoding="utf-8", errors="surrogateescape", buffering=1 << 16)


class RunFilesHandler(logging.Handler):
    """The run's files, one handler routing every record to its own.

    One file per agent (``<hostname>.log``, with its local worker 0) and per worker
    (``<hostname>[<local_rank>].log``) in ``folder``.
    """

    def __init__(
        self,
        folder: Path,
        hostnames: list[str],
        workers_per_host: list[int],
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.folder = folder
        self.hostnames = set(hostnames)
        self.files: dict[tuple[str, int | None], IO[str]] = {}
        for hostname, workers in zip(hostnames, workers_per_host, strict=True):
            for local_rank in (None, *range(workers)):  # every file, even for a silent run
                self._file(hostname, local_rank)

    def _file(self, hostname: str, local_rank: int | None) -> IO[str]:
        key = (hostname, local_rank)
        f = self.files.get(key)
        if f is None:
            suffix = "" if local_rank is None else f"[{local_rank}]"
            f = self.files[key] = _open(self.folder / f"{hostname}{suffix}.log")
        return f

    def emit(self, record: logging.LogRecord) -> None:
        """Append ``record`` to its worker's file (and its agent's, for local rank 0)."""
        hostname = getattr(record, "hostname", None)
        if hostname not in self.hostnames:
            return
        local_rank = getattr(record, "local_rank", None)
        line = _file_line(record)
        self._file(hostname, local_rank).write(line)
        if local_rank == 0:
            self._file(hostname, None).write(line)

    def handle_chunk(self, chunk: Chunk) -> None:
        """Append a plain chunk to its worker's file (and its agent's, for local rank 0)."""
        if chunk.hostname not in self.hostnames:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(chunk.created))
        msecs = int((chunk.created - int(chunk.created)) * 1000)
        level = logging.getLevelName(chunk.levelno)
        text = chunk.text(f"{stamp},{msecs:03d} {level} {chunk.name}: ")
        self._file(chunk.hostname, chunk.local_rank).write(text)
        if chunk.local_rank == 0:
            self._file(chunk.hostname, None).write(text)

    def flush(self) -> None:
        """Flush every file (once per batch of lines)."""
        for f in self.files.values():
            f.flush()

    def close(self) -> None:
        """Close every file."""
        for f in self.files.values():
            f.close()
        self.files.clear()
        super().close()


def file_handlers(
    hostnames: list[str],
    workers_per_host: list[int],
    log_dir: str | os.PathLike[str] = "torchrunx_logs",
    log_level: int = logging.NOTSET,
) -> list[logging.Handler]:
    """The run's files (``RunFilesHandler``) in a new folder under ``log_dir``.

    The folder is named by the time of the run's start; records below ``log_level`` are left out.
    """
    folder = _new_run_dir(Path(log_dir))
    return [RunFilesHandler(folder, hostnames, workers_per_host, log_level)]


def log_folder(log_dir: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """Where runs' log files go: ``log_dir``, else ``$TORCHRUNX_LOG_DIR``, else the default."""
    if log_dir is None:
        return os.environ.get("TORCHRUNX_LOG_DIR", "torchrunx_logs")
    return log_dir


def default_handlers(
    hostnames: list[str],
    workers_per_host: list[int],
    log_dir: str | os.PathLike[str] | None = None,
    live_ranks: Iterable[int] | None = (0,),
    label: str = "",
) -> list[logging.Handler]:
    """``live_ranks``' output and the agents' warnings live; files unless ``log_dir`` is ``""``.

    ``log_dir=None``: ``$TORCHRUNX_LOG_DIR``, else ``./torchrunx_logs``. ``label`` comes first
    in the live prefix (``[lr=0.1 node1:0]``: a sweep's item).
    """
    handlers: list[logging.Handler] = [LiveHandler(live_ranks, label)]
    log_dir = log_folder(log_dir)
    if str(log_dir) != "":
        handlers += file_handlers(hostnames, workers_per_host, log_dir, log_level_from_env())
    return handlers


@dataclass
class Chunk:
    """A chunk of output from one source, as it came: the records are made only if needed.

    Plain lines (a worker's prints, no logging record and no redraw among them) go to our own
    handlers whole, as bytes, a few C calls for thousands of lines; a handler of the user's
    gets records, one per line.
    """

    data: bytes
    name: str
    hostname: str
    local_rank: int | None
    rank: int | None
    stream: str
    levelno: int
    redraw: bool = False
    created: float = field(default_factory=time.time)
    _records: list[logging.LogRecord] | None = None

    @classmethod
    def of(cls, hostname: str, output: Output, data: bytes) -> Chunk:
        """The chunk an agent on ``hostname`` sent: ``data``, from where ``output`` says."""
        local_rank = output.local_rank
        return cls(
            data,
            name=f"torchrunx.{hostname}" + ("" if local_rank is None else f".{local_rank}"),
            hostname=hostname,
            local_rank=local_rank,
            rank=output.rank,
            stream=output.stream or "stderr",
            levelno=logging.getLevelName(output.level),
            redraw=output.redraw,
        )

    def to_loggers(self) -> None:
        """Hand each line's record to its logger (``torchrunx.<hostname>[.<local_rank>]``)."""
        for record in self.records():
            logging.getLogger(record.name).handle(record)

    @property
    def plain(self) -> bool:
        """A worker's lines of text only: no record of its own, no redraw (no agent's)."""
        return (
            self.local_rank is not None
            and not self.redraw
            and _MARK_BYTES not in self.data
            and b"\r" not in self.data
        )

    def records(self) -> list[logging.LogRecord]:
        """One record per line (the worker's own for marked lines), made once."""
        if self._records is None:
            self._records = output_records(
                self.data,
                name=self.name,
                hostname=self.hostname,
                local_rank=self.local_rank,
                rank=self.rank,
                stream=self.stream,
                level=self.levelno,
                created=self.created,
            )
            if self.redraw:  # a progress bar as it is now: for the live view only
                for record in self._records:
                    record.__dict__["redraw"] = True
        return self._records

    def text(self, prefix: str) -> str:
        """Every line, ``prefix`` first (plain chunks only)."""
        body = self.data.decode("utf-8", "surrogateescape")
        body = body.removesuffix("\n")
        return prefix + body.replace("\n", "\n" + prefix) + "\n"


def emit_batch(handlers: list[logging.Handler], chunk: Chunk) -> None:
    """Hand ``chunk`` to every handler (honouring its level and filters), then flush it.

    Our handlers (``handle_chunk``, no filters) take a plain chunk whole. Redraws of a line (a
    progress bar between its updates) go only to handlers that draw them (the live view); files
    and the user's handlers get the line once, as it ended.
    """
    for handler in handlers:
        whole = getattr(handler, "handle_chunk", None)
        if whole is not None and not handler.filters and chunk.plain:
            if chunk.levelno >= handler.level:
                whole(chunk)
        else:
            level = handler.level
            redraws = getattr(handler, "takes_redraws", False)
            for record in chunk.records():
                if record.levelno >= level and (redraws or not getattr(record, "redraw", False)):
                    handler.handle(record)
        handler.flush()


# ---- records on the wire

_MARK = "\x1etorchrunx\x1e"  # starts a stderr line that carries a worker's logging record
_MARK_BYTES = _MARK.encode()
_FORMATTER = logging.Formatter()
_TEMPLATE = logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__


def record_line(record: logging.LogRecord) -> str:
    """A worker's logging record as one line of its stderr (kept in order with its prints)."""
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + _FORMATTER.formatException(record.exc_info)
    if record.stack_info:
        message += "\n" + record.stack_info
    return _MARK + json.dumps([record.name, record.levelno, record.created, message]) + "\n"


def readable_line(line: str) -> str:
    """A line of worker output as a person reads it (a record as ``LEVEL name: message``)."""
    if not line.startswith(_MARK):
        return line
    try:
        name, level, _, message = json.loads(line[len(_MARK) :])
    except ValueError:
        return line
    return f"{logging.getLevelName(level)} {name}: {message}"


def _fields(base: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """A record's attributes for one line: the worker's own record's, if the line carries one.

    A line redrawn with a carriage return (a progress bar) is what it showed last.
    """
    if b"\r" in raw:
        drawn = [part for part in raw.split(b"\r") if part]
        raw = drawn[-1] if drawn else b""
    fields = base.copy()
    if raw.startswith(_MARK_BYTES):
        try:
            logger, levelno, created, message = json.loads(raw[len(_MARK_BYTES) :])
            fields.update(
                name=logger,
                levelno=levelno,
                levelname=logging.getLevelName(levelno),
                created=created,
                msecs=(created - int(created)) * 1000,
                msg=message,
            )
        except (ValueError, TypeError):
            fields["msg"] = raw.decode("utf-8", "surrogateescape")
        return fields
    fields["msg"] = raw.decode("utf-8", "surrogateescape")
    return fields


def output_records(  # noqa: PLR0913 -- one per attribute of the records
    data: bytes,
    *,
    name: str,
    hostname: str,
    local_rank: int | None,
    rank: int | None,
    stream: str,
    level: int,
    created: float | None = None,
) -> list[logging.LogRecord]:
    """Records for a chunk of output: one per line, or the worker's own for marked lines.

    Built without ``LogRecord.__init__`` (which looks up thread and process names): at 100,000
    lines a second that is most of the cost.
    """
    now = time.time() if created is None else created
    base: dict[str, Any] = {
        **_TEMPLATE,
        "name": name,
        "levelno": level,
        "levelname": logging.getLevelName(level),
        "created": now,
        "msecs": (now - int(now)) * 1000,
        "hostname": hostname,
        "local_rank": local_rank,
        "rank": rank,
        "stream": stream,
    }
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    records = []
    for raw in lines:
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__ = _fields(base, raw)
        records.append(record)
    return records
