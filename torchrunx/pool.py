"""The agents of one launcher: starting them (locally, over SSH, by srun), and stopping them.

::

    Launcher ─► AgentPool ─┬─ Controller (its thread owns the ROUTER socket)
                           ├─ local agent: our child, boot line on its stdin pipe
                           ├─ SSH agent: paramiko channel (sync_dir copied first, sync.Copies)
                           └─ srun agent: a job step of the allocation

An ``AgentPool`` owns the controller thread and one agent per host, described by
``AgentsConfig`` (where and how the agents run). It starts the agents that are missing
before each run, tells a run (``torchrunx.runs.Run``) which agents serve its hosts and
where their workers start, and stops them all (bounded, through ``torchrunx.reaper``).
"""

from __future__ import annotations

__all__ = ["AgentPool", "AgentsConfig"]

import concurrent.futures
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import reaper
from .controller import Bounds, Controller
from .environment import agent_base_env
from .errors import AgentFailedError
from .hosts import in_slurm_job, is_local, requeue_job, route_to, slurm_hostnames
from .links import AgentHandle
from .preemption import LauncherSignals
from .roster import Roster
from .standby import Standby
from .sync import Copies, Folder, Placement, Reach, SyncError
from .transport.messages import PROTOCOL_VERSION, Boot, json_line
from .transport.ssh import (
    Interpreter,
    RemoteAgentProcess,
    agent_command,
    explain_exit,
    open_ssh,
)

if TYPE_CHECKING:
    from .runs import Run

logger = logging.getLogger("torchrunx")

SSH_WINDOW = 64
"""At most this many SSH handshakes at once; the others wait for a slot."""
AGENT_GRACE_S = 5.0
"""How long a stopped agent gets to end its runs and exit on its own before it is killed."""


@dataclass(frozen=True)
class AgentsConfig:
    """Where a launcher's agents run and how they start; another config means other agents."""

    hostnames: tuple[str, ...]
    ssh_config_file: str | None
    env_file: str | None
    agent_timeout: float
    encrypt: bool
    agent_start: Literal["auto", "ssh", "srun"]
    preload: tuple[str, ...] = ()
    learn_preload: bool = True
    sync_dir: str | None = None  # a folder copied to every remote host (resolved)
    sync_exclude: tuple[str, ...] = ()
    pythons: tuple[tuple[str, str], ...] = ()  # (hostname, its interpreter), where not ours
    preempt_signals: tuple[str, ...] = ()
    preempt_grace: float = 0.0
    requeue: bool = False  # inside a SLURM job, after a preempted run
    heartbeat_timeout: float = 10.0  # a started agent's silence, at most
    spares: int = 0  # the last hostnames: warm, without ranks until a host is lost


class AgentPool:
    """The agents of one launcher and the controller thread that talks to them."""

    def __init__(self, config: AgentsConfig, owner: object) -> None:
        """Agents for ``config``; all are stopped when ``owner`` is garbage collected."""
        self.config = config
        self.hostnames = list(config.hostnames)
        self.secret = secrets.token_hex(32)
        bounds = Bounds(config.agent_timeout, config.heartbeat_timeout, config.preempt_grace)
        self.controller = controller = Controller(self.secret, bounds, encrypt=config.encrypt)
        controller.start()
        # this process's own preemption signals: the notice, through the controller thread
        self.signals = LauncherSignals(
            config.preempt_signals,
            lambda name: controller.on_thread(controller.preempt, "launcher", name),
        )
        self.requeued = False  # the SLURM job, once (see requeue)
        self.last_run = 0.0  # seconds since 1970: agents started after it are the next run's
        self.agents: list[AgentHandle | None] = [None] * len(self.hostnames)
        self.addresses = ["127.0.0.1"] * len(self.hostnames)  # remote: the peers of SSH sessions
        self.local_address: str | None = None  # ours, as remote hosts see it
        self.runs: weakref.WeakSet[Run] = weakref.WeakSet()  # in flight (see close)
        self.sweeps: weakref.WeakSet[Any] = weakref.WeakSet()  # the Sweeps on these agents
        self.standby = Standby(self)  # the next run's workers, ready (Launcher.standby)
        self.roster = Roster(self.hostnames, config.spares)  # who gets ranks; under the lock
        self._reviving: set[int] = set()  # lost hosts whose agent is being tried again
        self.lock = threading.Lock()
        self.copies = None  # of sync_dir, on the hosts
        if config.sync_dir is not None:
            folder = Folder(Path(config.sync_dir), config.sync_exclude)
            self.copies = Copies(folder, len(self.hostnames), config.agent_timeout)
        self._finalizer = weakref.finalize(
            owner, _close_pool, self.controller, self.agents, self.signals
        )

    # ---- starting agents

    def ensure_agents(self, env: dict[str, str]) -> list[AgentHandle]:
        """Start the agents not up yet (or failed), with ``env``; then wait for their hello.

        If any host cannot be started, every agent is stopped again: no host is left running
        an agent for a launcher that failed to start.
        """
        with self.lock:
            lost = {i for i, h in enumerate(self.hostnames) if h in self.roster.lost}
            missing = [
                i
                for i, a in enumerate(self.agents)
                if i not in lost and (a is None or a.failure is not None)
            ]
            _stop([a for a in (self.agents[i] for i in missing) if a is not None])
            for i in missing:
                self.agents[i] = None
            if self.copies is not None and missing:
                self.copies.look(missing)
            failures = self._start(missing, agent_base_env(env))
            agents = [a for i, a in enumerate(self.agents) if a is not None and i not in lost]
        failed = {h for h, _ in failures}  # the others may fail yet: every failed host is named
        failures += self._await_hello([a for a in agents if a.hostname not in failed])
        if failures:
            self.stop_agents()
            raise _start_failed(failures)
        return agents

    def _await_hello(self, agents: list[AgentHandle]) -> list[tuple[str, str]]:
        settled = self.controller.wait_for(
            lambda: all(a.facts is not None or a.failure is not None for a in agents),
            self.config.agent_timeout + 5,
        )
        return [
            (a.hostname, a.describe_failure() if a.failure else "its agent did not say hello")
            for a in agents
            if a.failure is not None or not settled
        ]

    def _start(self, indexes: list[int], env: dict[str, str]) -> list[tuple[str, str]]:
        """Start agents for ``indexes``: the remote ones all at once; failures as (host, why)."""
        steps = self._job_steps(indexes)
        remote = [i for i in indexes if i in steps or not is_local(self.hostnames[i])]
        failures: list[tuple[str, str]] = []
        if remote:
            if self.copies is not None and self._uses_srun():
                msg = (
                    "sync_dir copies the folder over SSH, but these agents start by srun, on "
                    "the allocation's shared filesystem: leave sync_dir off, or agent_start='ssh'"
                )
                raise ValueError(msg)
            start = self._start_srun if self._uses_srun() else self._start_ssh
            _raise_open_files_limit()  # each remote host holds several descriptors
            # a window: one bastion's sshd drops handshakes past its MaxStartups (default 10:30:100)
            window = min(len(remote), SSH_WINDOW)
            with concurrent.futures.ThreadPoolExecutor(window) as pool:
                futures = {i: pool.submit(start, i, env) for i in remote}
            for i, future in futures.items():
                error = future.exception()
                if error is None:
                    self.agents[i] = future.result()
                elif isinstance(error, Exception):  # SSH, network or the host itself: say which
                    failures.append((self.hostnames[i], str(error) or type(error).__name__))
                else:
                    raise error
        if failures:
            return failures
        for i in indexes:
            if i not in remote:
                address = self.controller.address
                try:
                    self.agents[i] = self._spawn(self.hostnames[i], [], env, address, "local")
                except AgentFailedError as e:
                    failures.append((self.hostnames[i], str(e)))
        return failures

    def _job_steps(self, indexes: list[int]) -> set[int]:
        """The hosts whose agents start as job steps: with srun, every node of the allocation.

        This node's too: at preemption SLURM signals the processes of job steps only, not the
        batch script's children, so an agent started here would never hear of it.
        """
        if not self._uses_srun():
            return set()
        try:
            nodes = set(slurm_hostnames())
        except (RuntimeError, OSError, subprocess.SubprocessError):
            return set()
        return {i for i in indexes if self.hostnames[i] in nodes}

    def _uses_srun(self) -> bool:
        if self.config.agent_start == "auto":
            return in_slurm_job() and shutil.which("srun") is not None
        return self.config.agent_start == "srun"

    def _start_ssh(self, index: int, _env: dict[str, str]) -> AgentHandle:
        """An agent over SSH; its environment travels on the control plane, not here."""
        hostname = self.hostnames[index]
        connection = open_ssh(hostname, self.config.ssh_config_file, self.config.agent_timeout)
        self.addresses[index] = connection.remote_address
        self.local_address = self.local_address or connection.local_address
        python = self._python(hostname)
        try:
            address = self.controller.address_on(connection.local_address)
            if self.copies is not None:
                self._copy_to(index, (hostname, connection, python))
            cwd = self.placement(index).cwd
            process = RemoteAgentProcess(connection, agent_command(python.path, cwd))
        except BaseException:
            connection.close()
            raise
        agent = AgentHandle(
            hostname,
            process,
            "ssh",
            explain_exit=lambda code: explain_exit(hostname, code, python, cwd),
        )
        self._boot(agent, address)
        return agent

    def _python(self, hostname: str) -> Interpreter:
        """The interpreter of ``hostname``'s agent."""
        chosen = dict(self.config.pythons).get(hostname)
        return Interpreter(sys.executable) if chosen is None else Interpreter(chosen, chosen=True)

    def _start_srun(self, index: int, env: dict[str, str]) -> AgentHandle:
        """An agent as a job step on one node of the allocation; srun forwards its stdin."""
        hostname = self.hostnames[index]
        local, self.addresses[index] = route_to(hostname)
        self.local_address = self.local_address or local
        address = self.controller.address_on(local)
        env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("SLURM")}}
        srun = [
            "srun", "--nodes=1", "--ntasks=1", f"--nodelist={hostname}",
            "--overlap",  # beside the batch step and the other agents, on the same CPUs
            "--quiet", "--kill-on-bad-exit=1", "--input=0",
        ]  # fmt: skip
        return self._spawn(hostname, srun, env, address, "srun")

    def _spawn(
        self,
        hostname: str,
        prefix: list[str],
        env: dict[str, str],
        address: str,
        started_by: Literal["local", "srun"],
    ) -> AgentHandle:
        """An agent as our child process (``prefix``, e.g. srun, may run it elsewhere)."""
        python = self._python(hostname).path if prefix else sys.executable
        process = subprocess.Popen(
            [*prefix, python, "-m", "torchrunx.agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=Path.cwd(),
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not the agent's
        )
        agent = AgentHandle(hostname, process, started_by)
        self._boot(agent, address)
        return agent

    def _boot(self, agent: AgentHandle, address: str) -> None:
        """Register the agent, then send its first line of stdin (which then stays open)."""
        self.controller.call_and_wait(self.controller.add_agent, agent)
        boot = Boot(
            version=PROTOCOL_VERSION,
            address=address,
            identity=agent.identity.hex(),
            secret=self.secret,
            hostname=agent.hostname,
            agent_timeout=self.config.agent_timeout,
            env_file=self.config.env_file,
            server_key=self.controller.server_key,
            preload=self.config.preload,
            learn=self.config.learn_preload,
            preempt_signals=self.config.preempt_signals,
        )
        stdin = agent.process.stdin
        assert stdin is not None  # noqa: S101 -- narrows the type: stdin is a pipe or channel
        try:
            stdin.write(json_line(boot))
            stdin.flush()
        except (OSError, EOFError) as e:  # it exited at once (EOFError: an SSH channel): say why
            reaper.end([agent.process], grace=AGENT_GRACE_S)  # killed if it has not, after all
            code = agent.process.poll()
            why = None if code is None else agent.explain_exit(code)
            msg = why or f"the agent on {agent.hostname} could not be started ({e}; exit {code})"
            raise AgentFailedError(msg, hostname=agent.hostname) from e

    # ---- copies of sync_dir on the hosts

    def _copy_to(self, index: int, host: Reach) -> None:
        """Bring host ``index``'s copy of ``sync_dir`` up to date before its agent starts."""
        assert self.copies is not None  # noqa: S101 -- only called with a folder to copy
        try:
            self.copies.bring(index, host)
        except SyncError as e:
            raise AgentFailedError(str(e), hostname=host[0]) from e

    def _reach(self, index: int) -> Reach:
        """Host ``index`` as copying needs it: its name, agent's connection and Python."""
        hostname, agent = self.hostnames[index], self.agents[index]
        if agent is None or not isinstance(agent.process, RemoteAgentProcess):
            msg = f"{hostname} has no agent over SSH to copy sync_dir through"
            raise AgentFailedError(msg, hostname=hostname)
        return hostname, agent.process.connection, self._python(hostname)

    # ---- lost hosts and spares

    def is_lost(self, hostname: str) -> bool:
        """Whether ``hostname``'s agent has failed (or was given up on)."""
        agent = self.agents[self.hostnames.index(hostname)]
        return hostname in self.roster.lost or agent is None or agent.failure is not None

    def replace_lost(self, hostnames: list[str]) -> list[str]:
        """``hostnames`` (a run's) with a spare in the place of each lost one, where one is left.

        A lost host without a spare for it stays, to be tried once more by ``ensure_agents()``.
        """
        with self.lock:
            chosen = list(hostnames)
            for g, host in enumerate(hostnames):
                if not self.is_lost(host) or host in self.roster.lost:
                    continue
                spare = self.roster.replace(host)
                if spare is None:
                    self.roster.retry(host)
                    continue
                chosen[g] = spare
                i = self.hostnames.index(host)
                agent, self.agents[i] = self.agents[i], None
                if agent is not None:  # what is left of it (a connection, a process): it is lost,
                    _stop([agent], grace=0)  # there is nothing to wait for
            return chosen

    def revive_lost(self, env: dict[str, str]) -> None:
        """Try the lost hosts' agents again, in the background: one that answers is a spare."""
        with self.lock:
            waiting = [
                i
                for i, h in enumerate(self.hostnames)
                if h in self.roster.lost and i not in self._reviving
            ]
            self._reviving.update(waiting)
        for i in waiting:
            name = f"torchrunx-revive-{self.hostnames[i]}"
            threading.Thread(target=self._revive, args=(i, env), name=name, daemon=True).start()

    def _revive(self, index: int, env: dict[str, str]) -> None:
        try:
            if self.copies is not None:
                self.copies.look([index])  # it may have lost its copy of sync_dir
            failures = self._start([index], agent_base_env(env))
            agent = self.agents[index]
            if not failures and agent is not None:
                failures = self._await_hello([agent])
            with self.lock:
                if failures:
                    _stop([a for a in [self.agents[index]] if a is not None])
                    self.agents[index] = None
                else:
                    self.roster.found(self.hostnames[index])
        finally:
            self._reviving.discard(index)

    # ---- what runs need of the agents

    def agents_of(self, hostnames: list[str]) -> tuple[list[int], list[AgentHandle]]:
        """The agents of ``hostnames`` (by index in the pool), their copies brought up to date."""
        lost = [h for h in hostnames if h in self.roster.lost]
        if lost:
            msg = f"{lost[0]} was lost (its agent failed) and has not answered since"
            raise AgentFailedError(msg, hostname=lost[0])
        indexes = [self.hostnames.index(h) for h in hostnames]
        failures = [] if self.copies is None else self.copies.update(indexes, self._reach)
        if failures:
            raise _start_failed(failures)
        return indexes, [a for a in (self.agents[i] for i in indexes) if a is not None]

    def starts_for_run(self, agents: list[AgentHandle]) -> list[tuple[float, float]]:
        """Each agent's start and hello (seconds since 1970) if it started for this run, else 0s.

        For the run's trace: agents started since the previous run started for this one.
        """
        previous, self.last_run = self.last_run, time.time()
        return [
            (a.started_at, a.hello_at) if a.started_at > previous else (0.0, 0.0) for a in agents
        ]

    def placement(self, index: int) -> Placement:
        """Where host ``index``'s workers start: here, or its copy of ``sync_dir``."""
        return Placement.here() if self.copies is None else self.copies.where(index)

    def host_address(self, index: int) -> str:
        """Where the other hosts reach host ``index`` (its workers bind there)."""
        if not is_local(self.hostnames[index]):
            return self.addresses[index]
        return self.local_address or "127.0.0.1"

    def requeue(self) -> None:
        """A preempted run has ended: requeue the SLURM job, once, if ``requeue`` says so.

        Where SLURM requeues the job itself (partition preemption), ours fails or ends the job
        a little earlier; either way it is requeued once.
        """
        if not self.config.requeue or self.requeued or not in_slurm_job():
            return
        self.requeued = True
        why = requeue_job()
        if why is not None:
            logger.warning("could not requeue the job after its preempted run: %s", why)

    # ---- stopping

    def stop_agents(self) -> None:
        """Stop every agent (bounded); the next run starts them again."""
        with self.lock:
            _stop([a for a in self.agents if a is not None])
            self.agents[:] = [None] * len(self.agents)

    def close(self) -> None:
        """Cancel the runs in flight, stop every agent and the controller."""
        self.standby.close()  # first: no run's end may make another
        for run in list(self.runs):
            run.handle.cancel()
        self._finalizer()


def _raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one.

    An SSH connection, its channels' pipes and a control-plane socket per host reach the common
    soft limit of 1024 at a few hundred hosts.
    """
    import resource  # noqa: PLC0415 -- POSIX only, and only launchers with remote hosts need it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # some systems refuse INFINITY
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start_failed(failures: list[tuple[str, str]]) -> AgentFailedError:
    hosts = [h for h, _ in failures]
    if len(failures) == 1:
        msg = failures[0][1]
    else:
        msg = f"agents failed to start on {hosts}:\n" + "\n".join(
            f"  {h}: {reason}" for h, reason in failures
        )
    return AgentFailedError(msg, hostname=hosts[0])


def _close_pool(
    controller: Controller, agents: list[AgentHandle | None], signals: LauncherSignals
) -> None:
    """Stop every agent (bounded) and the controller; safe at interpreter exit."""
    try:
        _stop([a for a in agents if a is not None])
    finally:
        signals.restore()
        controller.stop()


def _stop(agents: list[AgentHandle], grace: float = AGENT_GRACE_S) -> None:
    """Cut every agent's lifeline at once (each kills its runs and exits), then see them gone.

    One grace for all of them, not one each: an agent that does not leave within ``grace``
    (stopped, or hung; 0 for a lost one) is killed, and none is waited for past
    ``AGENT_GRACE_S`` more.
    """
    for agent in agents:
        stdin = agent.process.stdin
        if stdin is not None:
            with contextlib.suppress(OSError, EOFError):  # gone already
                stdin.close()
    reaper.end([a.process for a in agents], grace=grace, deadline=grace + AGENT_GRACE_S)
