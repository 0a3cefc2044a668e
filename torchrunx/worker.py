"""The worker: one rank of one run, in a process forked from the forkserver.

::

    agent                                   worker (rank r)
      │ ◄── connect ───────────────────────── connect (ipc, private directory)
      │ ◄── port {p} ───────────────────────── rank 0: TCPStore on an OS-assigned port
      │ ── rendezvous {master_port} ──────────► other ranks: connect to the store
      │                                        init_process_group, fn(*args, **kwargs)
      │ ◄── result [pickle, *buffers] / error ─
      │ ── ack ────────────────────────────────► exit

A result of 1 MiB or more goes straight to the launcher's socket instead (with the run's token),
and the agent only hears that it was delivered.

The worker never outlives its run: it exits right after the agent has its result, and dies with
the forkserver (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

__all__ = ["run_worker"]

import contextlib
import datetime as dt
import inspect
import itertools
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import zmq

from . import debugger, placement, preemption, sources, worker_stacks
from .hosts import count_gpus
from .logs import record_line
from .reaper import set_parent_death_signal
from .transport import serialization
from .transport.messages import (
    Ack,
    Connect,
    DebugInput,
    DirectResult,
    Fork,
    Go,
    Imported,
    Message,
    Phase,
    Phases,
    Port,
    Raised,
    Rendezvous,
    Result,
    Unpicklable,
    WorkerSlot,
    decode,
    encode,
    worker_identity,
)
from .transport.security import encrypt_client

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .transport.messages import RunSpec

M = TypeVar("M", bound=Message)

_ACK_TIMEOUT_MS = 60_000
_DIRECT_RESULT_BYTES = 1 << 20


def run_worker(fork: Fork, slot: WorkerSlot, payload: memoryview) -> NoReturn:
    """Run one rank and exit; called in the child right after ``fork``."""
    global _AT_FORK, _STARTED  # noqa: PLW0603 -- this process's own, taken once, at its start
    _STARTED = time.time()
    _AT_FORK = len(sys.modules)
    os.setsid()
    set_parent_death_signal()
    code = 1
    try:
        code = _Rank(fork, slot).execute(payload)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 -- a bug of ours: say so on stderr, exit non-zero
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


class _Rank:
    """One rank of a run, in its worker process."""

    def __init__(self, fork: Fork, slot: WorkerSlot) -> None:
        self.fork = fork
        self.spec = spec = fork.spec
        self.rank = slot.rank
        self.local_rank = slot.local_rank
        self.world_size = spec.world_size
        self.env = {
            **spec.env,
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "GROUP_RANK": str(spec.group_rank),
            "LOCAL_WORLD_SIZE": str(spec.local_world_size),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": spec.master_addr,
            "TORCHRUNX_RUN_ID": spec.run,
            # the attempt, under our name and torchrun's
            "TORCHRUNX_RESTART_COUNT": str(spec.attempt),
            "TORCHELASTIC_RESTART_COUNT": str(spec.attempt),
            "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
        }
        self.clock = _Clock(self.rank, on=spec.trace)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, _ACK_TIMEOUT_MS)
        self.sock.setsockopt(zmq.IDENTITY, worker_identity(spec.run, self.local_rank))
        self._go: list[Any] | None = None  # a standby run's function, once it came

    def execute(self, payload: memoryview) -> int:
        """Set up, call the function, send back its outcome; the process's exit code."""
        clock = self.clock
        with clock.phase("start"):
            self._set_up()
            gpu = _GpuWarmUp.start(self.local_rank) if self.spec.backend == "nccl" else None
            self.sock.connect(self.fork.endpoint)
            self.sock.send_multipart(encode(Connect()))
            where = (self.spec.run, self.rank, self.local_rank)
            channel = debugger.Channel(self._send_now, lambda: self._recv(DebugInput), where)
            debugger.install(self.spec.debug, self.rank, self.spec.hostname, channel)
        try:
            with clock.phase("rendezvous"):
                store = self._rendezvous()
            fn, args, kwargs = self._call_and_group(store, gpu, payload)
            with clock.phase("function"):
                value = fn(*args, **kwargs)
            self._report_imports()
            if store is not None:
                store.set(f"torchrunx/done/{self.rank}", "1")
        except Exception as e:  # noqa: BLE001 -- the user's exception: it goes back to the launcher
            self._report_imports()
            debugger.post_mortem(e)  # if asked for: a session where it was raised, first
            return self._send_error(e)
        try:
            with clock.phase("pickle"):
                frames = serialization.dumps(value)
        except Exception as e:  # noqa: BLE001 -- any pickling error is reported as the outcome
            return self._send_unpicklable(e, value)
        try:
            self._send_result(frames)
        except Exception as e:  # noqa: BLE001 -- the launcher could not be reached: say why
            return self._send_error(e)
        if store is not None:
            self._leave(store)
        return 0

    def _set_up(self) -> None:
        enter(self.env, self.spec.cwd, self.spec.sys_path)
        placement.apply(self.spec.devices, self.spec.local_world_size)  # before CUDA starts
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        worker_stacks.enable_dumps()  # the agent may ask where this rank is, whatever it is doing
        preemption.take_signals(self.spec.preempt_signals)  # a notice, not this rank's death
        worker_stacks.listen()  # the agent's notice, and its questions
        # the worker's logging records reach the launcher whole: logger name, level, time
        logging.root.addHandler(_RecordsToStderr())
        logging.root.setLevel(self.spec.log_level)

    def _report_imports(self) -> None:
        """What this run imported from installed packages, for the agent to preload next time.

        One rank per host says it (they import alike); only modules of installed packages and
        the standard library: the user's own files may change before the next run.
        """
        if self.local_rank != 0 or not self.fork.learn:
            return
        new = len(sys.modules) - _AT_FORK
        if new <= 0:
            return
        # the newest only (sys.modules keeps the order they came in): touching every module
        # would copy the pages the fork shares with the forkserver, milliseconds in every run
        cwd = str(Path.cwd()) + os.sep
        latest = list(itertools.islice(reversed(sys.modules.items()), new))
        modules = tuple(
            name
            for name, module in reversed(latest)
            if _installed(getattr(module, "__file__", None), cwd)
        )
        if modules:
            self.sock.send_multipart(encode(Imported(self.spec.run, modules)))

    def _leave(self, store: Any) -> None:
        """Nobody leaves before every rank is done.

        A peer may still be finishing its side of the process group's connections (gloo's mesh
        set-up is not symmetric). Rank 0 hosts the store, so it leaves last: a wait on a store
        whose host has gone may never return (a process the user forked can keep its sockets
        open).
        """
        store.wait([f"torchrunx/done/{r}" for r in range(self.world_size)])
        if self.rank == 0:
            store.wait([f"torchrunx/left/{r}" for r in range(1, self.world_size)])
        else:
            store.set(f"torchrunx/left/{self.rank}", "1")

    def _rendezvous(self) -> Any:
        """Rank 0 hosts the store on an OS-assigned port; the port reaches the others via us."""
        spec = self.spec
        timeout = dt.timedelta(seconds=spec.worker_timeout)
        store = None
        if self.rank == 0:
            if spec.backend is None:
                port = _free_port()
            else:
                store = _master_store(spec.master_addr, self.world_size, timeout)
                port = store.port
            self.sock.send_multipart(encode(Port(run=spec.run, port=port)))
        else:
            port = self._recv(Rendezvous).master_port
            if spec.backend is not None:
                from torch.distributed import TCPStore  # noqa: PLC0415

                store = TCPStore(
                    spec.master_addr, port, self.world_size, is_master=False, timeout=timeout
                )
        os.environ["MASTER_PORT"] = str(port)
        return store

    def _init_process_group(self, store: Any, gpu: _GpuWarmUp | None) -> None:
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        worker_stacks.record_collectives()
        extra: dict[str, Any] = {}
        if gpu is not None:
            gpu.join(self.spec.worker_timeout)
            self.clock.add("CUDA context", *gpu.span)
            # each worker its own GPU, as NCCL expects: cuda:LOCAL_RANK is the current device;
            # with device_id, torch sets up NCCL's communicator now (in the background where
            # TORCH_NCCL_USE_COMM_NONBLOCKING is on), not at the first collective
            torch.cuda.set_device(self.local_rank)
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                extra["device_id"] = torch.device("cuda", self.local_rank)
        dist.init_process_group(
            backend=self.spec.backend,
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=dt.timedelta(seconds=self.spec.worker_timeout),
            **extra,
        )

    def _call_and_group(
        self, store: Any, gpu: _GpuWarmUp | None, payload: memoryview
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """The call to make, and the process group made: a standby worker's in that order."""
        clock = self.clock
        if self.spec.standby:  # ready first; the function comes when the run is asked for
            self._get_ready(store, gpu)
            with clock.phase("standby"):
                frames = self._wait_for_go()
            with clock.phase("unpickle"):
                call: tuple[Any, tuple[Any, ...], dict[str, Any]] = serialization.loads(frames)
            return call
        with clock.phase("unpickle"):
            call = serialization.loads(_split(payload, self.fork.payload_sizes))
        if self.spec.backend is not None:
            with clock.phase("process group"):
                self._init_process_group(store, gpu)
        return call

    def _get_ready(self, store: Any, gpu: _GpuWarmUp | None) -> None:
        """A standby worker's set-up: its process group, and NCCL's communicator made now."""
        if self.spec.backend is None:
            return
        with self.clock.phase("process group"):
            self._init_process_group(store, gpu)
        if self.spec.backend == "nccl":  # its communicator is made at the first collective
            import torch  # noqa: PLC0415
            import torch.distributed as dist  # noqa: PLC0415

            with self.clock.phase("warm-up"):
                dist.all_reduce(torch.zeros(1, device=f"cuda:{self.local_rank}"))
                torch.cuda.synchronize()

    def _wait_for_go(self) -> list[Any]:
        """The function, pickled, when the launcher hands this standby worker its run."""
        while self._go is None:
            self._recv(Go)
        return self._go

    def _recv(self, expected: type[M]) -> M:
        while True:
            message, frames = decode(self.sock.recv_multipart(copy=False))
            if isinstance(message, Go):  # may come before the rendezvous: kept for later
                self._go = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
            if isinstance(message, expected):
                return message
            if isinstance(message, Go):
                continue
            if not isinstance(message, Rendezvous):  # rank 0 hears of its own port: no news
                msg = f"worker expected {expected.KIND!r} from its agent, got {message.KIND!r}"
                raise TypeError(msg)

    def _send_now(self, message: Message) -> None:
        self.sock.send_multipart(encode(message))

    def _send(self, message: Message, frames: list[Any]) -> None:
        """Send the outcome and wait until the agent has it: only then may this process exit."""
        if self.clock.phases:  # the run is traced: its phases go first
            self._send_now(Phases(self.spec.run, tuple(self.clock.phases)))
        self.sock.send_multipart(encode(message, *frames), copy=False)
        if self.sock.poll(_ACK_TIMEOUT_MS):
            self._recv(Ack)

    def _send_result(self, frames: list[Any]) -> None:
        """Large results go straight to the launcher: one hop instead of two, twice the speed."""
        where = (self.spec.run, self.rank, self.local_rank)
        if sum(memoryview(f).nbytes for f in frames) < _DIRECT_RESULT_BYTES:
            self._send(Result(*where), frames)
            return
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        encrypt_client(sock, self.spec.server_key)
        try:
            sock.connect(self.fork.launcher)
            direct = DirectResult(run=self.spec.run, rank=self.rank, token=self.spec.result_token)
            sock.send_multipart(encode(direct, *frames), copy=False)
            if not sock.poll(_ACK_TIMEOUT_MS):
                msg = f"the launcher did not confirm rank {self.rank}'s result within 60 s"
                raise TimeoutError(msg)
            sock.recv_multipart()
        finally:
            sock.close()
        self._send(Result(*where, direct=True), [])

    def _send_error(self, e: BaseException) -> int:
        what = _described(e, self.spec)
        e.__traceback__ = None  # frames would drag every local variable into the pickle
        unpicklable = None
        try:
            frames = serialization.dumps(e)
            serialization.loads(frames)  # fails here, not in the launcher, if it cannot return
        except Exception as pickling_error:  # noqa: BLE001 -- it is sent back as text instead
            unpicklable = _safe_str(pickling_error)
            frames = []
        where = (self.spec.run, self.rank, self.local_rank)
        self._send(Raised(*where, *what, unpicklable=unpicklable), frames)
        return 0

    def _send_unpicklable(self, e: BaseException, value: object) -> int:
        where = (self.spec.run, self.rank, self.local_rank)
        what = _described(e, self.spec)
        self._send(Unpicklable(*where, type(value).__qualname__, *what), [])
        return 0


class _Clock:
    """Times the phases of a rank, for the run's trace (only if it is traced)."""

    def __init__(self, rank: int, *, on: bool) -> None:
        self.rank = rank
        self.on = on
        self.phases: list[Phase] = []
        self.started = _STARTED
        self.open: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (the first phase starts when the process did)."""
        self.open[name] = self.started if not self.phases and not self.open else time.time()
        try:
            yield
        finally:
            self.end(name)

    def add(self, name: str, start: float, end: float) -> None:
        """A phase timed elsewhere (on another thread)."""
        if self.on and end >= start > 0:
            self.phases.append(Phase(self.rank, name, start, end))

    def end(self, name: str) -> None:
        """End ``name`` now, if it is open."""
        start = self.open.pop(name, None)
        if start is not None:
            self.add(name, start, time.time())


class _GpuWarmUp:
    """This worker's CUDA context, made on a thread while the rendezvous goes on (0.15 s+).

    The context is the process's; the current device is each thread's, so the main thread still
    sets its own (at no cost once the context exists).
    """

    def __init__(self, device: int) -> None:
        self.device = device
        self.span = (0.0, 0.0)  # when it ran, for the run's trace
        self.thread = threading.Thread(target=self._run, name="torchrunx-cuda", daemon=True)

    @classmethod
    def start(cls, local_rank: int) -> _GpuWarmUp | None:
        """Start it if this worker has a GPU of its own (``cuda:LOCAL_RANK``).

        The GPUs are counted from the driver's files: asking CUDA would initialise its driver
        on this thread, the very wait the warm-up is to take off it.
        """
        if local_rank >= count_gpus():
            return None
        warm = cls(local_rank)
        warm.thread.start()
        return warm

    def _run(self) -> None:
        import torch  # noqa: PLC0415

        start = time.time()
        with contextlib.suppress(Exception):  # the main thread meets the error itself, later
            torch.cuda.set_device(self.device)
            torch.empty(0, device=f"cuda:{self.device}")
        self.span = (start, time.time())

    def join(self, timeout: float) -> None:
        """Wait for the context (bounded: past ``timeout`` the main thread makes its own)."""
        self.thread.join(timeout)


def enter(env: dict[str, str], cwd: str, sys_path: tuple[str, ...]) -> None:
    """Take on a run's environment, working directory and ``sys.path`` (the launcher's)."""
    os.environ.update(env)
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    # the launcher's order first (a host's copy of sync_dir leads), then what this process had
    sys.path[:] = dict.fromkeys([*sys_path, *sys.path])


_AT_FORK = 0  # how many modules this process had when it was forked
_STARTED = 0.0  # when it was forked (seconds since 1970)
_PACKAGE_FOLDERS = ("site-packages", "dist-packages")


def _installed(file: object, cwd: str) -> bool:
    """A module file to learn: installed, and neither ours nor the user's working directory's."""
    return (
        isinstance(file, str)
        and sources.is_installed(file)
        and not sources.is_ours(file)
        and not _users_own(file, cwd)
    )


def _users_own(file: str, cwd: str) -> bool:
    """In the working directory, and not in a package folder there (a project's ``.venv``).

    Packages in a virtual environment inside the project are installed all the same: the user
    edits their own files, not those.
    """
    if not file.startswith(cwd):
        return False
    folders = Path(file[len(cwd) :]).parts[:-1]
    return not any(f in _PACKAGE_FOLDERS for f in folders)


def _described(e: BaseException, spec: RunSpec) -> tuple[str, str, str]:
    """An exception as text: its type's full name, its message, its formatted traceback.

    The traceback starts in the user's function: the frames of ours above it (this module's, a
    script's start by the ``torchrunx`` command through runpy) say nothing the user can act on
    (unless the error is ours, and then they are all there is). Files of
    this host's copy of ``sync_dir`` are named as the launcher's: the traceback then points at
    the files the user edits, which hold the same contents.
    """
    tb = e.__traceback__
    while tb is not None and sources.is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))
    text = sources.in_launchers_terms(text, spec.copy, spec.copied_from)
    return f"{type(e).__module__}.{type(e).__qualname__}", _safe_str(e), text


class _RecordsToStderr(logging.Handler):
    """Writes each record as one marked line of stderr, in order with what the worker prints."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` (see ``torchrunx.logs.record_line()``), unless it is written."""
        try:
            if _on_the_terminal_already(record):
                return
            sys.stderr.write(record_line(record))
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- logging must never raise into the user's code
            self.handleError(record)


def _on_the_terminal_already(record: logging.LogRecord) -> bool:
    """Whether a handler on the record's way up to ours has written it to stdout or stderr.

    Libraries such as Lightning give their loggers a stream handler of their own and let records
    propagate; without a root handler (as under torchrun) each record is printed once, and so it
    must be here: the line that handler wrote is what the user sees.
    """
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger is not logging.root:
        for handler in logger.handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and handler.stream in streams
                and record.levelno >= handler.level
            ):
                return True
        logger = logger.parent
    return False


def _split(payload: memoryview, sizes: tuple[int, ...]) -> list[memoryview]:
    frames, start = [], 0
    for size in sizes:
        frames.append(payload[start : start + size])
        start += size
    return frames


def _master_store(host: str, world_size: int, timeout: dt.timedelta) -> Any:
    """Rank 0's TCPStore, on a socket we bind: port 0 (no race) and the host's own family.

    torch binds a dual-stack IPv6 socket by itself and then looks up the name of every peer's
    IPv4-mapped address, which no hosts file lists: a DNS query per connection, and a
    resolver that drops one stalls the run by its timeout (5 s). An IPv4 socket's peers are
    found in the hosts file.
    """
    from torch.distributed import TCPStore  # noqa: PLC0415

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind(("", 0))
        listener.listen(1024)
        port = listener.getsockname()[1]
        options: dict[str, Any] = {
            "timeout": timeout,
            "wait_for_workers": False,
            "master_listen_fd": listener.fileno(),
        }
        try:
            return TCPStore(host, port, world_size, is_master=True, **options)
        except NotImplementedError:
            # torch 2.4 to 2.7: their default server (libuv) refuses a socket it did not bind,
            # before it takes it; the older server takes it
            return TCPStore(host, port, world_size, is_master=True, **options, use_libuv=False)
    finally:
        if listener.fileno() >= 0:
            listener.detach()  # the store owns it now


def _free_port() -> int:
    """A port for users who build their own process group (``backend=None``)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 -- a broken __str__ must not hide the error
        return f"<{type(e).__name__}: str() failed>"
