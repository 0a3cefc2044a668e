"""The agent's manager of its forkservers: one for every run, one that preloads what runs import.

::

    agent ─┬─► base forkserver: torch (and the launcher's ``preload``), from the start
           ├─► learned forkserver: that, ``torch._dynamo``, and what earlier runs imported,
           │   imported in their environment; runs of that environment fork from it
           └─► retiring forkservers: learned ones since replaced, until their runs are cleared

A forkserver never imports once it has forked: an import takes seconds, and a worker's exit or a
new run must not wait behind it. So what the runs import is learned by starting a *new* learned
forkserver, in the background, while the base one (and the previous learned one) go on serving.
When its imports are done it takes the next runs, and the one it replaces leaves once its runs
are cleared.

The rules, so that a run from a learned forkserver behaves as one from a fresh process:

- only modules of installed packages and the standard library are learned, never files of the
  working directory (the user may edit them between runs);
- they are imported with the run's environment variables, working directory and ``sys.path``,
  and only runs with the same three fork from that forkserver (others use the base one);
- a module whose import starts a thread or initialises CUDA is never learned: the forkserver that
  imported it says so and exits (forking a process with more threads is not safe).

A forkserver no longer needed is killed, not asked to leave, and waited for within a deadline
(``torchrunx.reaper.end()``).
"""

from __future__ import annotations

__all__ = ["WARM", "Forkserver", "Forkservers", "setup_key"]

import hashlib
import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import zmq

from . import reaper
from .transport.messages import Message, Preload, Preloaded, RunSpec
from .transport.unix import send_message

_STOP_DEADLINE_S = reaper.DEADLINE_S
"""Longest wait for a killed forkserver to be gone; past it, it is reported and given up on."""
WARM = ("torch._dynamo", "torch.nn.parallel")
"""What many functions import first thing (``DistributedDataParallel`` pulls in ``torch._dynamo``:
2.5 s on 2 cores); learned from the start."""


def setup_key(spec: RunSpec) -> str:
    """What a learned forkserver must share with a run: env, working directory, ``sys.path``."""
    text = json.dumps([sorted(spec.env.items()), spec.cwd, list(spec.sys_path)])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(eq=False)
class Forkserver:
    """One forkserver process, as the agent sees it."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    key: str = ""  # the setup its modules were imported in ("": the agent's own)
    modules: tuple[str, ...] = ()  # what it imports beyond the base
    ready: bool = True  # its imports are done: runs may fork from it
    runs: set[str] = field(default_factory=set)
    retiring: bool = False  # replaced: it leaves once its runs are cleared

    @property
    def pid(self) -> int:
        """The forkserver's pid: the parent (and subreaper) of its runs' processes."""
        return self.process.pid


class Forkservers:
    """The base forkserver, the learned one (ready, or being built) and those retiring."""

    def __init__(
        self,
        poller: zmq.Poller,
        preload: tuple[str, ...],
        *,
        learn: bool,
        ignore: tuple[str, ...] = (),
    ) -> None:
        """Forkservers on ``poller``; each ignores the signals ``ignore`` (preemption's)."""
        self.poller = poller
        self.learn_enabled = learn
        self.ignore = ",".join(ignore)
        self.all: list[Forkserver] = []
        self.base = self._spawn(Preload(preload, strict=False) if preload else None)
        self.learned: Forkserver | None = None  # the newest: ready, or importing
        self.wanted: dict[str, None] = dict.fromkeys(WARM)  # what runs imported, in order
        self.never: set[str] = set()  # failed to import alone, or unsafe to fork after
        self.warnings: list[str] = []  # for the launcher: an unsafe explicit preload

    def _spawn(self, preload: Preload | None, key: str = "") -> Forkserver:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "torchrunx.forkserver", str(theirs.fileno()), self.ignore],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        server = Forkserver(process, ours, key)
        if preload is not None:
            send_message(ours, preload)  # before any fork: it is read first
            server.modules = preload.modules
            server.ready = preload.env is None  # an explicit preload: forks queue behind it
        self.all.append(server)
        self.poller.register(ours.fileno(), zmq.POLLIN)
        return server

    def by_fd(self, fd: int) -> Forkserver | None:
        """The forkserver whose socket is ``fd``."""
        return next((f for f in self.all if f.sock.fileno() == fd), None)

    def for_run(self, run: str, key: str) -> Forkserver:
        """The forkserver a run forks from: the learned one if ready for its setup."""
        learned = self.learned
        server = learned if learned and learned.ready and learned.key == key else self.base
        server.runs.add(run)
        return server

    def cleared(self, run: str) -> None:
        """A run has no process left: a retiring forkserver it held may leave."""
        for server in list(self.all):
            server.runs.discard(run)
            if server.retiring and not server.runs:
                self._stop(server)

    def imported(self, modules: tuple[str, ...], spec: RunSpec, key: str) -> None:
        """A run of ``spec`` (``key``: its ``setup_key()``) imported ``modules``: learn them."""
        if not self.learn_enabled:
            return
        self.wanted.update(dict.fromkeys(m for m in modules if m not in self.never))
        learned = self.learned
        if learned is not None and not learned.ready:
            return  # one at a time: the next run's report starts the next one
        if learned is not None and learned.key == key and set(self.wanted) <= set(learned.modules):
            return
        modules = tuple(m for m in self.wanted if m not in self.never)
        preload = Preload(modules, env=spec.env, cwd=spec.cwd, sys_path=spec.sys_path)
        self.learned = self._spawn(preload, key)
        if learned is not None:
            self._retire(learned)

    def on_message(self, server: Forkserver, message: Message) -> None:
        """A forkserver's answer to a ``Preload``."""
        if not isinstance(message, Preloaded):
            return
        self.never.update(message.failed)
        if message.failed and server is self.base:
            self.warnings.append(f"preload: cannot import {', '.join(message.failed)}")
        if message.unsafe and server is self.base:  # the user's own preload: say so, go on
            self.warnings.append(
                f"preload: importing {message.unsafe!r} leaves the forkserver unsafe to fork "
                f"({message.why}); workers may deadlock: remove it from preload"
            )
        elif message.unsafe:  # never learned; this forkserver is of no use
            self.never.add(message.unsafe)
            self._stop(server)
        else:
            server.ready = True

    def lost(self, server: Forkserver) -> bool:
        """It closed its socket: ``True`` if nothing depended on it (not the base, no runs)."""
        expected = server is not self.base and not server.runs
        self._stop(server)
        return expected

    def _retire(self, server: Forkserver) -> None:
        server.retiring = True
        if not server.runs:
            self._stop(server)

    def _stop(self, server: Forkserver) -> None:
        """End it now: it has no run left, so no child (its runs are cleared), or is of no use.

        Killed rather than asked: an interpreter's own exit with torch loaded takes a while,
        and the agent must not wait for it.
        """
        self._forget(server)
        self._end([server])

    def _forget(self, server: Forkserver) -> None:
        if server in self.all:
            self.all.remove(server)
            self.poller.unregister(server.sock.fileno())
            server.sock.close()
        if server is self.learned:
            self.learned = None

    def kill(self) -> None:
        """The agent is closing: every forkserver goes (their workers die with them)."""
        servers = list(self.all)
        self._end(servers)
        for server in servers:
            self._forget(server)

    def _end(self, servers: list[Forkserver]) -> None:
        """Kill them at once, and wait (bounded) until they are reaped."""
        left = reaper.end([s.process for s in servers], grace=0, deadline=_STOP_DEADLINE_S)
        stuck = [s.pid for s in servers if s.process in left]
        if stuck:  # in the kernel, past a kill: nothing more to do than say so
            self.warnings.append(f"forkservers {stuck} did not exit within {_STOP_DEADLINE_S} s")
