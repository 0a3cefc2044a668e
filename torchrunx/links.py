"""The launcher's links to its agents: ``AgentHandle``, and the watch on their processes.

::

    controller thread's poller
      ├─ pidfd of each agent that is our child (local, or srun here) ─► exited: why, in words
      └─ stderr of each agent (an SSH agent's reaches EOF when it has exited) ─► its last lines

``AgentWatch`` turns an agent's exit into a reason (``killed by SIGKILL``, ``its SSH
session ended``) handed to the controller, which fails the agent's runs. It is touched only by
the controller thread.
"""

from __future__ import annotations

__all__ = ["AgentHandle", "AgentWatch"]

import os
import secrets
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import zmq

from .transport.messages import HostFacts
from .transport.ssh import RemoteAgentProcess

_STDERR_TAIL = 30
_EXITED_WAIT_S = 5.0  # an agent whose pidfd or stderr said "exited" has its status within this


@dataclass
class AgentHandle:
    """One agent as the launcher sees it."""

    hostname: str
    process: subprocess.Popen[bytes] | RemoteAgentProcess
    started_by: Literal["local", "ssh", "srun"]  # local: on this machine, our child
    identity: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    facts: HostFacts | None = None
    failure: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_TAIL))
    pidfd: int = -1
    partial_err: bytes = b""
    explain_exit: Callable[[int], str | None] = lambda _code: None
    started_at: float = field(default_factory=time.time)  # seconds since 1970, for traces
    hello_at: float = 0.0

    @property
    def ready(self) -> bool:
        """Connected and authenticated, and not failed."""
        return self.facts is not None and self.failure is None

    def describe_failure(self) -> str:
        """The failure with the last lines the agent wrote to stderr, if any."""
        tail = [line for line in self.stderr_tail if line.strip()]
        text = f"{self.failure}"
        if tail:
            text += "\nlast lines of its stderr:\n  " + "\n  ".join(tail)
        return text


class AgentWatch:
    """The agents' exits (pidfd) and stderr, on the controller's poller."""

    def __init__(self, poller: zmq.Poller, on_exit: Callable[[AgentHandle, str], None]) -> None:
        """Watch on ``poller``; ``on_exit(agent, why)`` when an agent has exited."""
        self._poller = poller
        self._on_exit = on_exit
        self._fds: dict[int, tuple[Literal["exit", "stderr"], AgentHandle]] = {}

    def add(self, agent: AgentHandle) -> None:
        """Watch a newly started agent."""
        if agent.started_by != "ssh":  # our child: local, or srun here for another node
            agent.pidfd = os.pidfd_open(agent.process.pid)
            self._watch(agent.pidfd, "exit", agent)
        # an SSH agent's exit is the end of its stderr (see RemoteAgentProcess)
        if agent.process.stderr is not None:
            fd = agent.process.stderr.fileno()
            os.set_blocking(fd, False)
            self._watch(fd, "stderr", agent)

    def watches(self, fd: int) -> bool:
        """Whether ``fd`` is one of the agents' (the poller names fds, not agents)."""
        return fd in self._fds

    def on_readable(self, fd: int) -> None:
        """An agent's pidfd or stderr is readable."""
        entry = self._fds.get(fd)
        if entry is None:
            return  # unwatched earlier in this same round
        what, agent = entry
        if what == "stderr":
            self.drain_stderr(agent)
        else:
            self._unwatch(fd)
            self._exited(agent)

    def drain_stderr(self, agent: AgentHandle) -> None:
        """Keep the last lines the agent wrote to stderr (they explain its failure)."""
        stream = agent.process.stderr
        if stream is None or stream.closed or stream.fileno() not in self._fds:
            return
        data, eof = _read_all(stream.fileno(), agent.partial_err)
        if eof:
            self._unwatch(stream.fileno())
            stream.close()
        lines = data.split(b"\n")
        agent.partial_err = lines.pop()
        if eof and agent.partial_err:
            lines.append(agent.partial_err)
        agent.stderr_tail.extend(line.decode(errors="replace") for line in lines)
        if eof and agent.started_by == "ssh":
            self._exited(agent)

    def close(self, agents: list[AgentHandle]) -> None:
        """Stop watching; close what the watch opened."""
        for fd in list(self._fds):
            self._unwatch(fd)
        for agent in agents:
            if agent.pidfd >= 0:
                os.close(agent.pidfd)
            if agent.process.stderr is not None:
                agent.process.stderr.close()

    def _watch(self, fd: int, what: Literal["exit", "stderr"], agent: AgentHandle) -> None:
        self._fds[fd] = (what, agent)
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _exited(self, agent: AgentHandle) -> None:
        try:
            code = agent.process.wait(_EXITED_WAIT_S)
        except subprocess.TimeoutExpired:
            code = 255  # it said it exited but has no status yet: as a dropped connection
        self.drain_stderr(agent)
        self._on_exit(agent, _why_exited(agent, code))


def _why_exited(agent: AgentHandle, code: int) -> str:
    """An agent's exit, in words."""
    explained = agent.explain_exit(code)
    if explained is not None:
        return explained
    pid = agent.process.pid if agent.process.pid > 0 or agent.facts is None else agent.facts.pid
    who = f"the agent on {agent.hostname} (pid {pid})"
    if code < 0:
        return f"{who} was killed by {signal.Signals(-code).name}"
    if code == 255 and agent.started_by == "ssh":
        return (
            f"{who} is gone: its SSH session ended without an exit status (the agent "
            "was killed, or the connection to the host dropped)"
        )
    return f"{who} exited with code {code}"


def _read_all(fd: int, data: bytes) -> tuple[bytes, bool]:
    """``data`` and what the non-blocking ``fd`` holds; whether it reached its end."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data, False
        if not chunk:
            return data, True
        data += chunk
