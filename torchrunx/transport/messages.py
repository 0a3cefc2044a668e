"""The wire contract: every message between launcher, agent, forkserver and worker is a typed value.

A message is a frozen dataclass whose class names its ``KIND``. On a ZeroMQ socket it travels as
``[kind, header, *buffers]``: ``header`` is the JSON of its fields (plain data, never a pickle: a
header is read before anything is trusted) and ``buffers`` are opaque bytes (pickles and their
out-of-band buffers) that only the launcher and the workers unpickle. Between agent and
forkserver the same header rides a local socket (``.unix``). Decoding checks every field's
type; a message that does not fit raises ``WireError`` and is dropped by its reader.

=============  ==========================  ====================================================
kind           sent                        carries
=============  ==========================  ====================================================
boot           launcher → agent (stdin)    protocol version, where to connect, secrets
hello          agent → launcher            protocol version, secret, host facts
heartbeat      launcher ↔ agent            nothing: "still here"
signalled      agent → launcher            a preemption signal reached the agent: its name
notice         launcher → agent            a preemption notice: tell every rank, now and later
run            launcher → agent            a run's spec for this host; buffers: the payload
credit         launcher → agent            bytes of output handled (flow control)
cancel         launcher → agent            a run to tear down
rendezvous     launcher → agent → worker   rank 0's store port
cleared        agent → launcher            a run has no process left on the host
phases         worker or agent → launcher  timed phases of a run, for its trace file
output         agent → launcher            where a chunk of output came from; buffer: it
died           agent → launcher            a worker that ended without an outcome
dump           launcher → agent            dump the stacks of a run's live workers, now
stacks         agent → launcher            the stacks of a run's live workers (and who was silent)
status         agent → launcher            each worker's state, pid, memory, CPU, GPU, last line
up             forkserver → agent          it is ready
preload        agent → forkserver          modules to import before forking, and in what env
preloaded      forkserver → agent          what it imported, and what would make forking unsafe
fork           agent → forkserver          a run to fork workers for; pipes attached
forked         forkserver → agent          a worker's pid
exited         forkserver → agent          a child's wait status
connect        worker → agent              the worker is up
imported       worker → agent              the installed modules the run imported (to preload)
port           worker → agent → launcher   rank 0's store port
result         worker → agent → launcher   buffers: the pickled return value (< 1 MiB)
direct         worker → launcher           the run's token; buffers: a large return value
error          worker → agent → launcher   the exception; buffers: it, pickled, if it can be
unpicklable    worker → agent → launcher   a return value that cannot be pickled
ack            agent or launcher → worker  the outcome has arrived: the worker may exit
debug          worker → agent → launcher   a rank's debugger session: pdb's output, its state
debug-input    launcher → agent → worker   a line typed at that session's prompt (or its end)
sync-offer     launcher → host (SSH)       a folder's files: path, SHA-256, size, mode
sync-want      host → launcher             the contents it lacks; they follow, as chunks
sync-done      host → launcher             where its copy of the folder is, what was written
=============  ==========================  ====================================================

The ``sync-*`` messages travel as JSON lines over an SSH channel of their own, before the agent
starts and again before a run whose folder changed (``torchrunx.sync``).
"""

from __future__ import annotations

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "PROTOCOL_VERSION",
    "Ack",
    "AskFor",
    "Boot",
    "Cancel",
    "Cleared",
    "Connect",
    "Credit",
    "Debug",
    "DebugInput",
    "DebugSettings",
    "DebugState",
    "Devices",
    "Died",
    "DirectResult",
    "Dump",
    "Exited",
    "Fork",
    "Forked",
    "Go",
    "Heartbeat",
    "Hello",
    "HostFacts",
    "Imported",
    "Level",
    "Message",
    "Notice",
    "Output",
    "Phase",
    "Phases",
    "Port",
    "Preload",
    "Preloaded",
    "Raised",
    "RankStack",
    "RankState",
    "RankStatus",
    "Rendezvous",
    "Result",
    "Run",
    "RunSpec",
    "Signalled",
    "Stacks",
    "Status",
    "Stream",
    "SyncDone",
    "SyncFile",
    "SyncOffer",
    "SyncWant",
    "Unpicklable",
    "Up",
    "VersionMismatchError",
    "WireError",
    "WorkerSlot",
    "decode",
    "encode",
    "from_json",
    "json_line",
    "parse",
    "parse_worker_identity",
    "to_json",
    "worker_identity",
]

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    import zmq

    from .serialization import Buffer

PROTOCOL_VERSION = 6
"""Launcher and agent must speak the same; it travels in ``boot`` and ``hello``."""
HEARTBEAT_INTERVAL_S = 1.0
"""How often launcher and agent tell each other they are alive (each side's silence is bounded
by ``agent_timeout``)."""

Stream = Literal["stdout", "stderr"]
"""A worker's output stream."""
Level = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
"""A ``logging`` level, by name."""
AskFor = Literal["stacks", "status"]
"""What a ``Dump`` asks of a run's live workers."""
RankState = Literal["starting", "standby", "running", "returned", "failed", "cleared"]
"""Where a rank is in its run (``cleared``: the run has ended everywhere)."""
DebugState = Literal["output", "prompt", "over", "quit", "skipped", "completions"]
"""What a rank's debugger session does now (see ``Debug``)."""

M = TypeVar("M", bound="Message")
T = TypeVar("T")


class WireError(ValueError):
    """A message that does not fit the contract: unknown kind, missing or mistyped field."""


class VersionMismatchError(WireError):
    """The peer speaks another protocol version (another torchrunx release)."""

    def __init__(self, peer: str, theirs: object) -> None:
        super().__init__(
            f"the {peer} speaks torchrunx protocol version {theirs!r}, this process speaks "
            f"{PROTOCOL_VERSION}: install the same torchrunx release on every host"
        )
        self.theirs = theirs


_KINDS: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    """Base of every message; a subclass sets ``KIND`` and is registered under it."""

    KIND: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND in _KINDS:
            msg = f"two message classes of kind {cls.KIND!r}"
            raise TypeError(msg)
        _KINDS[cls.KIND] = cls


# ---- launcher and agent


@dataclass(frozen=True)
class HostFacts:
    """What an agent tells the launcher about its host."""

    pid: int
    hostname: str
    gpus: int
    cpus: int
    python: str
    dir: str  # the agent's private folder


@dataclass(frozen=True)
class Boot(Message):
    """The agent's first line of stdin: where to connect and how to prove itself."""

    KIND = "boot"
    version: int
    address: str
    identity: str  # hex: the agent's ZeroMQ identity
    secret: str
    hostname: str
    agent_timeout: float
    env_file: str | None
    server_key: str | None
    preload: tuple[str, ...] = ()  # modules every forkserver imports before its first fork
    learn: bool = True  # preload, while idle, what the workers of earlier runs imported
    preempt_signals: tuple[str, ...] = ()  # signal names that are a preemption notice, not death


@dataclass(frozen=True)
class Hello(Message):
    """The agent's first message: who it is, proven by the launcher's secret."""

    KIND = "hello"
    version: int
    secret: str
    facts: HostFacts


@dataclass(frozen=True)
class Heartbeat(Message):
    """Still here (both ways, every second)."""

    KIND = "heartbeat"


@dataclass(frozen=True)
class Signalled(Message):
    """A preemption signal reached the agent (``signal``: its name)."""

    KIND = "signalled"
    signal: str


@dataclass(frozen=True)
class Notice(Message):
    """The launcher has a preemption notice: every rank of every run, now and later, is told."""

    KIND = "notice"


@dataclass(frozen=True)
class WorkerSlot:
    """One worker of a host: its global and local rank."""

    rank: int
    local_rank: int


@dataclass(frozen=True)
class DebugSettings:
    """What a ``breakpoint()`` in a worker does (see ``torchrunx.debugger``)."""

    terminal: bool  # the launcher's stdin is a terminal: a session opens there; else it is skipped
    ranks: tuple[int, ...] | None  # the ranks that may stop; None: every rank
    post_mortem: bool  # an exception in the function opens a session at its frame first


@dataclass(frozen=True)
class Devices:
    """A run's share of its host, in a sweep: slots ``slots`` of the host's ``of``.

    A slot is a GPU on a host that has them, else a group of its cores (see
    ``torchrunx.placement``).
    """

    slots: tuple[int, ...]
    of: int


@dataclass(frozen=True)
class RunSpec:
    """Everything one host's agent and workers need to run their part of a run."""

    run: str
    world_size: int
    backend: str | None
    master_addr: str
    env: dict[str, str]
    cwd: str
    sys_path: tuple[str, ...]
    worker_timeout: float
    result_token: str  # proves a direct result belongs to this run
    log_level: int
    server_key: str | None
    group_rank: int
    hostname: str  # this host, as the launcher names it
    address: str  # where the other hosts reach this one
    local_world_size: int
    workers: tuple[WorkerSlot, ...]
    debug: DebugSettings
    trace: bool = False  # its workers and agent time their phases (``Phases``)
    copy: str = ""  # this host's copy of sync_dir, if it has one ...
    copied_from: str = ""  # ... and that folder on the launcher's machine
    preempt_signals: tuple[str, ...] = ()  # a worker that gets one takes note, and lives on
    attempt: int = 0  # restarts of the run before this one (not in env: see setup_key)
    max_restarts: int = 0
    devices: Devices | None = None  # a sweep's run: its own GPUs or cores; None: the host's
    standby: bool = False  # forked ahead of its run: the function comes later, with Go


@dataclass(frozen=True)
class Run(Message):
    """Start a run on this host; buffers: the pickled ``(fn, args, kwargs)``."""

    KIND = "run"
    spec: RunSpec


@dataclass(frozen=True)
class Credit(Message):
    """The launcher has handled this many more bytes of output."""

    KIND = "credit"
    bytes: int


@dataclass(frozen=True)
class Go(Message):
    """A standby run's function: call it now; buffers: the pickled ``(fn, args, kwargs)``.

    Launcher → agent → each of the run's workers, which wait for it with their process group
    made (see ``RunSpec.standby``).
    """

    KIND = "go"
    run: str


@dataclass(frozen=True)
class Cancel(Message):
    """Tear the run down on this host."""

    KIND = "cancel"
    run: str


@dataclass(frozen=True)
class Rendezvous(Message):
    """Rank 0's store listens on ``master_port``."""

    KIND = "rendezvous"
    run: str
    master_port: int


@dataclass(frozen=True)
class Phase:
    """A stretch of a run on one rank (``rank`` -1: the host's agent), in seconds since 1970."""

    rank: int
    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Phases(Message):
    """Timed phases of a run, for its trace (``TORCHRUNX_TRACE``)."""

    KIND = "phases"
    run: str
    phases: tuple[Phase, ...]


@dataclass(frozen=True)
class Cleared(Message):
    """No process of the run is left on the agent's host."""

    KIND = "cleared"
    run: str


@dataclass(frozen=True)
class Output(Message):
    """A chunk of output (the buffer): a worker's stream, or the agent's own message."""

    KIND = "output"
    run: str | None = None
    rank: int | None = None
    local_rank: int | None = None
    stream: Stream | None = None  # None: the agent's own, at ``level``
    level: Level = "WARNING"
    redraw: bool = False  # the line being redrawn with "\r" (a progress bar), as it is now


@dataclass(frozen=True)
class Died(Message):
    """A worker ended without sending an outcome."""

    KIND = "died"
    run: str
    rank: int
    local_rank: int
    pid: int
    tail: tuple[str, ...]  # its last lines of output
    exitcode: int | None = None
    signal: str | None = None  # a signal's name (or number, as text, if it has none)
    stack: str | None = None  # its stacks as it died of a fatal signal, if it could dump them


@dataclass(frozen=True)
class Dump(Message):
    """Dump the stacks of the run's live workers, or (``what="status"``) say how each is.

    ``request`` names the answer (``Stacks`` or ``Status``).
    """

    KIND = "dump"
    run: str
    request: str
    what: AskFor = "stacks"


@dataclass(frozen=True)
class RankStack:
    """One worker's Python stack, every thread (``faulthandler``'s text)."""

    rank: int
    local_rank: int
    text: str


@dataclass(frozen=True)
class RankStatus:
    """One rank of a run, as its agent sees it now (``RunHandle.status()``)."""

    rank: int
    hostname: str
    local_rank: int
    pid: int | None
    state: RankState
    seconds: float  # since it was forked
    rss: int  # bytes of memory
    cpu_percent: float  # since the last status (100: one core)
    gpu_memory: int | None  # bytes on GPUs; None where the host has no GPU (or no NVML)
    since_output: float | None  # seconds since its last line of output; None: none yet
    last_line: str
    attempt: int = 0  # the run's restarts before this attempt

    def __str__(self) -> str:
        """One line: ``rank 1 node2[1] running pid 77 12.0 s 1.2 GiB 99% CPU: its last line``."""
        gpu = "" if self.gpu_memory is None else f" GPU {_size(self.gpu_memory)}"
        last = f": {self.last_line}" if self.last_line else ""
        return (
            f"rank {self.rank} {self.hostname}[{self.local_rank}] {self.state} pid {self.pid} "
            f"{self.seconds:.1f} s {_size(self.rss)} {self.cpu_percent:.0f}% CPU{gpu}{last}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class Status(Message):
    """The status of the run's ranks on one host, for a ``Dump`` with ``what="status"``."""

    KIND = "status"
    run: str
    request: str
    ranks: tuple[RankStatus, ...]


@dataclass(frozen=True)
class Stacks(Message):
    """The stacks of the run's live workers on one host; ``silent``: ranks that did not answer.

    Sent for a ``Dump`` (its ``request``), and unasked (``request=None``) when the run
    fails or is cancelled, before its processes are killed: the autopsy.
    """

    KIND = "stacks"
    run: str
    request: str | None
    ranks: tuple[RankStack, ...]
    silent: tuple[int, ...]


# ---- agent and forkserver


@dataclass(frozen=True)
class Up(Message):
    """The forkserver is ready."""

    KIND = "up"
    pid: int


@dataclass(frozen=True)
class Preload(Message):
    """Import ``modules`` before any fork, in the workers' ``env``, ``cwd`` and ``sys_path``.

    ``env`` None: as the forkserver is (the agent's environment).
    """

    KIND = "preload"
    modules: tuple[str, ...]
    strict: bool = True  # stop (and exit) at the first module that leaves forking unsafe
    env: dict[str, str] | None = None
    cwd: str = ""
    sys_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preloaded(Message):
    """What a ``Preload`` did; ``unsafe``: the module after which forking is not safe."""

    KIND = "preloaded"
    imported: tuple[str, ...]
    failed: tuple[str, ...]
    unsafe: str = ""
    why: str = ""  # what makes it unsafe: "CUDA initialised", "2 threads more"


@dataclass(frozen=True)
class Imported(Message):
    """The installed modules a worker imported beyond what its forkserver had (in order)."""

    KIND = "imported"
    run: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Fork(Message):
    """Fork the workers of a run (the spec's env as the agent completed it); pipes attached."""

    KIND = "fork"
    spec: RunSpec
    endpoint: str  # the agent's socket for its workers
    launcher: str  # the launcher's socket, for direct results
    payload_sizes: tuple[int, ...]
    learn: bool = False  # rank 0 of the host says what it imported (``Imported``)


@dataclass(frozen=True)
class Forked(Message):
    """A worker of the run is forked."""

    KIND = "forked"
    run: str
    local_rank: int
    pid: int


@dataclass(frozen=True)
class Exited(Message):
    """A child of the forkserver exited (``os.waitpid`` status)."""

    KIND = "exited"
    pid: int
    status: int


# ---- workers


@dataclass(frozen=True)
class Connect(Message):
    """A worker is up and connected to its agent."""

    KIND = "connect"


@dataclass(frozen=True)
class Port(Message):
    """Rank 0's store listens on ``port``."""

    KIND = "port"
    run: str
    port: int


@dataclass(frozen=True)
class Result(Message):
    """A worker's return value (the buffers), or news that it went to the launcher directly."""

    KIND = "result"
    run: str
    rank: int
    local_rank: int
    direct: bool = False


@dataclass(frozen=True)
class DirectResult(Message):
    """A large return value sent straight to the launcher, with the run's token."""

    KIND = "direct"
    run: str
    rank: int
    token: str


@dataclass(frozen=True)
class Raised(Message):
    """The function raised; buffers: the exception pickled, unless ``unpicklable`` says why not."""

    KIND = "error"
    run: str
    rank: int
    local_rank: int
    type: str
    message: str
    traceback: str
    unpicklable: str | None = None


@dataclass(frozen=True)
class Unpicklable(Message):
    """The function returned a ``value_type`` that cannot be pickled (``type``: the error)."""

    KIND = "unpicklable"
    run: str
    rank: int
    local_rank: int
    value_type: str
    type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Ack(Message):
    """The worker's outcome has arrived."""

    KIND = "ack"


@dataclass(frozen=True)
class Debug(Message):
    """A rank's debugger session: what pdb wrote since, and what it does now (``state``).

    ``output``: more will come; ``prompt``: pdb waits for a line (``DebugInput``);
    ``over``: the rank goes on (``c``), the terminal is free; ``quit``: the run is to end
    (``text``: how); ``skipped``: a breakpoint was skipped (``text``: the warning, which the
    agent sends on as its own); ``completions``: the answer to a ``DebugInput`` that asked
    for them (``text``: one per line), while pdb still waits for its line.
    ``why``: why the rank stopped (``breakpoint() at train.py:12``), in a session's first message.
    """

    KIND = "debug"
    run: str
    rank: int
    local_rank: int
    text: str
    state: DebugState
    why: str = ""


@dataclass(frozen=True)
class DebugInput(Message):
    """A line typed at a rank's prompt; ``None``: the input ended (EOF at the prompt).

    With ``complete`` (where the word to complete begins in ``line``, the line up to the
    cursor): not a line but Tab, answered by a ``completions`` ``Debug``.
    """

    KIND = "debug-input"
    run: str
    local_rank: int
    line: str | None
    why: str = ""  # how the input ended: "Ctrl-C at the prompt"
    complete: int | None = None


# ---- a folder copied to a host (as JSON lines, not over ZeroMQ)


@dataclass(frozen=True)
class SyncFile:
    """A file of the folder: its path (relative, ``/``-separated) and content."""

    path: str
    sha256: str
    size: int
    executable: bool


@dataclass(frozen=True)
class SyncOffer(Message):
    """The folder as it is now; the host answers with what it lacks."""

    KIND = "sync-offer"
    version: int
    name: str  # of the host's copy, in its cache: one per launcher machine and folder
    files: tuple[SyncFile, ...]


@dataclass(frozen=True)
class SyncWant(Message):
    """The contents (SHA-256) the host has nowhere in its copy: each follows, in this order."""

    KIND = "sync-want"
    contents: tuple[str, ...]


@dataclass(frozen=True)
class SyncDone(Message):
    """The host's copy matches the offer."""

    KIND = "sync-done"
    path: str  # the copy's folder on the host
    received: int  # bytes of content that came over the wire
    written: int  # files (re)written


# ---- encoding


def to_json(value: object) -> Any:
    """Plain JSON data of a message, a dataclass or a value inside one."""
    kind = type(value)
    if kind in _SCALARS or value is None:
        return value
    names = _FIELDS.get(kind, ())
    if names == ():
        names = _FIELDS[kind] = (
            tuple(f.name for f in dataclasses.fields(kind))
            if dataclasses.is_dataclass(kind)
            else None
        )
    if names is not None:
        return {name: to_json(getattr(value, name)) for name in names}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


_SCALARS = frozenset({str, int, float, bool})
_FIELDS: dict[type, tuple[str, ...] | None] = {}  # a dataclass's field names; None: not one


def encode(message: Message, *buffers: Buffer) -> list[Buffer]:
    """The frames of ``message`` and its buffers."""
    header = json.dumps(to_json(message), separators=(",", ":"))
    return [message.KIND.encode(), header.encode(), *buffers]


def decode(frames: Sequence[zmq.Frame | bytes]) -> tuple[Message, list[zmq.Frame | bytes]]:
    """The message in ``frames`` and its buffers; raises ``WireError`` if it does not fit."""
    if len(frames) < 2:
        msg = f"a message has at least 2 frames, got {len(frames)}"
        raise WireError(msg)
    try:
        kind = _as_bytes(frames[0]).decode("ascii")
        header = json.loads(_as_bytes(frames[1]))
    except (UnicodeDecodeError, ValueError) as e:
        msg = f"a message's kind or header is not readable: {e}"
        raise WireError(msg) from e
    cls = _KINDS.get(kind)
    if cls is None:
        msg = f"unknown message kind {kind!r}"
        raise WireError(msg)
    return _checked(cls, header), list(frames[2:])


def parse(cls: type[M], header: bytes | bytearray) -> M:
    """A ``cls`` message from its JSON header alone (the agent's boot line)."""
    try:
        data = json.loads(header)
    except ValueError as e:
        msg = f"a {cls.KIND} message is not JSON: {e}"
        raise WireError(msg) from e
    return _checked(cls, data)


def _checked(cls: type[M], data: object) -> M:
    """``from_json``, after the protocol version if the message has one (it decides the rest)."""
    if isinstance(data, dict) and "version" in data and data["version"] != PROTOCOL_VERSION:
        raise VersionMismatchError(peer="peer", theirs=data["version"])
    return from_json(cls, data)


def from_json(cls: type[T], data: object) -> T:
    """A ``cls`` (a dataclass) built from JSON data, every field's type checked."""
    if not isinstance(data, dict):
        msg = f"{cls.__name__}: expected an object, got {type(data).__name__}"
        raise WireError(msg)
    converters = _converters(typing.cast("type", cls))
    values = {}
    for name, value in data.items():
        convert = converters.get(name)
        if convert is None:
            msg = f"{cls.__name__}: unknown fields {sorted(set(data) - set(converters))}"
            raise WireError(msg)
        try:
            values[name] = convert(value)
        except _MismatchError as e:
            msg = f"{cls.__name__}: field {name!r}: {value!r} is not a {e}"
            raise WireError(msg) from None
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        msg = f"{cls.__name__}: {e}"
        raise WireError(msg) from e


class _MismatchError(Exception):
    """A value that is not of its field's type (the message: the type)."""


Converter = typing.Callable[[Any], Any]


@cache
def _converters(cls: type) -> dict[str, Converter]:
    """One converter per field, made once per class: decoding is on the hot path of output."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    return {name: _converter(tp) for name, tp in hints.items() if name in names}


def _converter(tp: Any) -> Converter:
    """A function that checks a JSON value against ``tp`` and builds it (tuples, dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # only ever ``X | None`` here
        (inner,) = [_converter(o) for o in typing.get_args(tp) if o is not type(None)]
        return lambda v: None if v is None else inner(v)
    if origin is Literal:  # one of the listed strings, nothing else
        allowed = frozenset(typing.get_args(tp))
        return lambda v: v if type(v) is str and v in allowed else _mismatch(tp)
    if dataclasses.is_dataclass(tp):
        return lambda v: from_json(tp, v)  # type: ignore[arg-type]
    if origin in (list, tuple, dict):
        return _container(tp, origin)
    if tp is float:
        return lambda v: float(v) if type(v) in (int, float) else _mismatch(tp)
    if tp in (int, str, bool):
        return lambda v: v if type(v) is tp else _mismatch(tp)
    msg = f"no converter for {tp}"
    raise TypeError(msg)


def _container(tp: Any, origin: type) -> Converter:
    """A converter of a JSON array (to a list or tuple) or object, item by item."""
    if origin is dict:
        value = _converter(typing.get_args(tp)[1])
        return lambda v: {k: value(x) for k, x in v.items()} if type(v) is dict else _mismatch(tp)
    item = _converter(typing.get_args(tp)[0])
    return lambda v: origin(map(item, v)) if type(v) is list else _mismatch(tp)


def json_line(message: Message) -> bytes:
    """``message`` as one line of JSON: how it travels on a byte stream (stdin, an SSH channel).

    ``parse()`` reads it back.
    """
    return json.dumps(to_json(message), separators=(",", ":")).encode() + b"\n"


def worker_identity(run: str, local_rank: int) -> bytes:
    """The ZeroMQ identity of a run's worker on its agent's socket."""
    return f"{run}:{local_rank}".encode()


def parse_worker_identity(identity: bytes) -> tuple[str, int]:
    """The run and local rank of a ``worker_identity()``; ``WireError`` if not one."""
    run, _, local_rank = identity.decode(errors="replace").rpartition(":")
    if not run or not local_rank.isdigit():
        msg = f"not a worker's identity: {identity!r}"
        raise WireError(msg)
    return run, int(local_rank)


def _mismatch(tp: Any) -> typing.NoReturn:
    raise _MismatchError(tp)


def _as_bytes(frame: zmq.Frame | bytes) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes
