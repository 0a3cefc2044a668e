"""The worker: one rank of one run, in a process forked from the forkserver.

::

    agent                                   worker (rank r)
      │ ◄── hello ─────────────────────────── connect (ipc, private directory)
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
import logging
import os
import socket
import sys
import traceback
from typing import Any, NoReturn

import zmq

from .logs import record_line
from .reaper import set_parent_death_signal
from .transport import serialization
from .transport.messages import decode, encode
from .transport.security import encrypt_client

_ACK_TIMEOUT_MS = 60_000
_DIRECT_RESULT_BYTES = 1 << 20


def run_worker(spec: dict[str, Any], worker: dict[str, Any], payload: memoryview) -> NoReturn:
    """Run one rank and exit; called in the child right after ``fork``."""
    os.setsid()
    set_parent_death_signal()
    code = 1
    try:
        code = _Worker(spec, worker).run(payload)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 -- a bug of ours: say so on stderr, exit non-zero
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


class _Worker:
    def __init__(self, spec: dict[str, Any], worker: dict[str, Any]) -> None:
        self.spec = spec
        self.rank: int = worker["rank"]
        self.local_rank: int = worker["local_rank"]
        self.world_size: int = spec["world_size"]
        self.env = {
            **spec["env"],
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "GROUP_RANK": str(spec["group_rank"]),
            "LOCAL_WORLD_SIZE": str(spec["local_world_size"]),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": spec["master_addr"],
            "TORCHRUNX_RUN_ID": spec["run"],
        }
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, _ACK_TIMEOUT_MS)
        self.sock.setsockopt(zmq.IDENTITY, f"{spec['run']}:{self.local_rank}".encode())

    def run(self, payload: memoryview) -> int:
        os.environ.update(self.env)
        with contextlib.suppress(OSError):
            os.chdir(self.spec["cwd"])
        sys.path[:0] = [p for p in self.spec["sys_path"] if p not in sys.path]
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        # the worker's logging records reach the launcher whole: logger name, level, time
        logging.root.addHandler(_RecordsToStderr())
        logging.root.setLevel(self.spec.get("log_level", logging.INFO))

        self.sock.connect(self.spec["endpoint"])
        self.sock.send_multipart(encode("hello", {}))
        try:
            store = self._rendezvous()
            fn, args, kwargs = serialization.loads(_split(payload, self.spec["payload_sizes"]))
            if self.spec["backend"] is not None:
                self._init_process_group(store)
            value = fn(*args, **kwargs)
            if store is not None:
                store.set(f"torchrunx/done/{self.rank}", "1")
        except Exception as e:  # noqa: BLE001 -- the user's exception: it goes back to the launcher
            return self._send_error(e)
        try:
            frames = serialization.dumps(value)
        except Exception as e:  # noqa: BLE001 -- any pickling error is reported as the outcome
            return self._send_error(e, while_pickling=value)
        try:
            self._send_result(frames)
        except Exception as e:  # noqa: BLE001 -- the launcher could not be reached: say why
            return self._send_error(e)
        if store is not None:
            # Nobody leaves before every rank is done: a peer may still be finishing its side of
            # the process group's connections (gloo's mesh set-up is not symmetric). Rank 0
            # hosts the store, so it leaves last: a wait on a store whose host has gone may
            # never return (a process the user forked can keep its sockets open).
            store.wait([f"torchrunx/done/{r}" for r in range(self.world_size)])
            if self.rank == 0:
                store.wait([f"torchrunx/left/{r}" for r in range(1, self.world_size)])
            else:
                store.set(f"torchrunx/left/{self.rank}", "1")
        return 0

    def _rendezvous(self) -> Any:
        """Rank 0 hosts the store on an OS-assigned port; the port reaches the others via us."""
        backend = self.spec["backend"]
        if self.rank == 0:
            if backend is None:
                port = _free_port()
                store = None
            else:
                store = _master_store(
                    self.spec["master_addr"],
                    self.world_size,
                    dt.timedelta(seconds=self.spec["worker_timeout"]),
                )
                port = store.port
            self.sock.send_multipart(encode("port", {"port": port}))
        else:
            port = self._recv("rendezvous")["master_port"]
            store = None
            if backend is not None:
                from torch.distributed import TCPStore  # noqa: PLC0415

                store = TCPStore(
                    self.spec["master_addr"],
                    port,
                    self.world_size,
                    is_master=False,
                    timeout=dt.timedelta(seconds=self.spec["worker_timeout"]),
                )
        os.environ["MASTER_PORT"] = str(port)
        return store

    def _init_process_group(self, store: Any) -> None:
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        if self.spec["backend"] == "nccl" and self.local_rank < torch.cuda.device_count():
            # each worker its own GPU, as NCCL expects: cuda:LOCAL_RANK is the current device
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(
            backend=self.spec["backend"],
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=dt.timedelta(seconds=self.spec["worker_timeout"]),
        )

    def _recv(self, expected: str) -> dict[str, Any]:
        while True:
            kind, header, _ = decode(self.sock.recv_multipart())
            if kind == expected:
                return header
            if kind != "rendezvous":  # rank 0 is told the port it chose: nothing to do
                msg = f"worker expected a {expected!r} message from its agent, got {kind!r}"
                raise RuntimeError(msg)

    def _send(self, kind: str, header: dict[str, Any], frames: list[Any]) -> None:
        """Send the outcome and wait until the agent has it: only then may this process exit."""
        self.sock.send_multipart(encode(kind, header, *frames), copy=False)
        if self.sock.poll(_ACK_TIMEOUT_MS):
            self._recv("ack")

    def _send_result(self, frames: list[Any]) -> None:
        """Large results go straight to the launcher: one hop instead of two, twice the speed."""
        if sum(memoryview(f).nbytes for f in frames) < _DIRECT_RESULT_BYTES:
            self._send("result", {}, frames)
            return
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        encrypt_client(sock, self.spec.get("server_key"))
        try:
            sock.connect(self.spec["launcher"])
            token = self.spec["result_token"]
            header = {"run": self.spec["run"], "rank": self.rank, "token": token}
            sock.send_multipart(encode("result", header, *frames), copy=False)
            if not sock.poll(_ACK_TIMEOUT_MS):
                msg = f"the launcher did not confirm rank {self.rank}'s result within 60 s"
                raise TimeoutError(msg)
            sock.recv_multipart()
        finally:
            sock.close()
        self._send("result", {"direct": True}, [])

    def _send_error(self, e: BaseException, *, while_pickling: object = None) -> int:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        header = {
            "type": f"{type(e).__module__}.{type(e).__qualname__}",
            "message": _safe_str(e),
            "traceback": tb,
        }
        if while_pickling is not None:
            header["unpicklable_result"] = type(while_pickling).__qualname__
            self._send("error", header, [])
            return 0
        e.__traceback__ = None  # frames would drag every local variable into the pickle
        try:
            frames = serialization.dumps(e)
            serialization.loads(frames)  # fails here, not in the launcher, if it cannot return
        except Exception as pickling_error:  # noqa: BLE001 -- it is sent back as text instead
            header["unpicklable"] = _safe_str(pickling_error)
            frames = []
        self._send("error", header, frames)
        return 0


class _RecordsToStderr(logging.Handler):
    """Writes each record as one marked line of stderr, in order with what the worker prints."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` (see :func:`torchrunx.logs.record_line`), unless it is written."""
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


def _split(payload: memoryview, sizes: list[int]) -> list[memoryview]:
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
        return TCPStore(
            host,
            port,
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )
    except TypeError:  # a torch without master_listen_fd: let it bind
        listener.close()
        return TCPStore(
            host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
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
