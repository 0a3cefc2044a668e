"""The agents of one launcher, how they start (locally, over SSH, by srun), and its runs.

An :class:`AgentPool` owns the controller thread and one agent per host; ``submit`` turns a
function and its arguments into a run on some of those agents and returns its handle.
"""

from __future__ import annotations

__all__ = ["AgentPool"]

import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .controller import AgentHandle, Controller, RunState
from .environment import agent_base_env, copied_env
from .errors import AgentFailedError
from .failures import raise_failure, unpickle_result
from .hosts import in_slurm_job, is_local, route_to
from .logs import default_handlers, emit_batch, log_level_from_env
from .result import LaunchResult
from .runs import RunHandle
from .transport import serialization
from .transport.ssh import RemoteAgentProcess, agent_command, explain_exit, open_ssh

if TYPE_CHECKING:
    from collections.abc import Callable

    from .launcher import Launcher


class AgentPool:
    """The agents of one launcher and the controller thread that talks to them."""

    def __init__(self, key: tuple[Any, ...], hostnames: list[str], launcher: Launcher) -> None:
        self.key = key
        self.hostnames = hostnames
        self.secret = secrets.token_hex(32)
        self.controller = Controller(self.secret, launcher.agent_timeout, encrypt=launcher.encrypt)
        self.controller.start()
        self.agents: list[AgentHandle | None] = [None] * len(hostnames)
        self.addresses = ["127.0.0.1"] * len(hostnames)  # remote ones: the peers of SSH sessions
        self.local_address: str | None = None  # ours, as remote hosts see it
        self.handles: weakref.WeakSet[RunHandle[Any]] = weakref.WeakSet()  # runs in flight
        self.lock = threading.Lock()
        self._finalizer = weakref.finalize(launcher, _close_pool, self.controller, self.agents)

    def ensure_agents(self, launcher: Launcher) -> list[AgentHandle]:
        """Start the agents not up yet (or failed), then wait for their hello.

        If any host cannot be started, every agent is stopped again: no host is left running
        an agent for a launcher that failed to start.
        """
        with self.lock:
            missing = [i for i, a in enumerate(self.agents) if a is None or a.failure is not None]
            for i in missing:
                old = self.agents[i]
                if old is not None:
                    _stop_agent(old)
                    self.agents[i] = None
            failures = self._start(missing, launcher)
            agents = [a for a in self.agents if a is not None]
        if not failures:
            settled = self.controller.wait_for(
                lambda: all(a.facts is not None or a.failure is not None for a in agents),
                launcher.agent_timeout + 5,
            )
            failures = [
                (a.hostname, a.describe_failure() if a.failure else "its agent did not say hello")
                for a in agents
                if a.failure is not None or not settled
            ]
        if failures:
            self.stop_agents()
            hosts = [h for h, _ in failures]
            if len(failures) == 1:
                msg = failures[0][1]
            else:
                msg = f"agents failed to start on {hosts}:\n" + "\n".join(
                    f"  {h}: {reason}" for h, reason in failures
                )
            raise AgentFailedError(msg, hostname=hosts[0])
        return agents

    def _start(self, indexes: list[int], launcher: Launcher) -> list[tuple[str, str]]:
        """Start agents for ``indexes``: the remote ones all at once; failures as (host, why)."""
        remote = [i for i in indexes if not is_local(self.hostnames[i])]
        failures: list[tuple[str, str]] = []
        if remote:
            start = self._start_srun if _uses_srun(launcher) else self._start_remote
            with concurrent.futures.ThreadPoolExecutor(len(remote)) as pool:
                futures = {i: pool.submit(start, i, launcher) for i in remote}
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
        env = agent_base_env(copied_env(launcher.copy_env_vars, launcher.extra_env_vars))
        for i in indexes:
            if i not in remote:
                hostname, address = self.hostnames[i], self.controller.address
                self.agents[i] = self._spawn(hostname, [], env, address, launcher)
        return []

    def _start_remote(self, index: int, launcher: Launcher) -> AgentHandle:
        hostname = self.hostnames[index]
        connection = open_ssh(hostname, launcher.ssh_config_file, launcher.agent_timeout)
        self.addresses[index] = connection.remote_address
        self.local_address = self.local_address or connection.local_address
        try:
            address = self.controller.address_on(connection.local_address)
            python, cwd = sys.executable, str(Path.cwd())
            process = RemoteAgentProcess(connection, agent_command(python, cwd))
        except BaseException:
            connection.close()
            raise
        agent = AgentHandle(
            hostname, process, explain_exit=lambda code: explain_exit(hostname, code, python, cwd)
        )
        self._boot(agent, address, launcher)
        return agent

    def _start_srun(self, index: int, launcher: Launcher) -> AgentHandle:
        """An agent as a job step on one node of the allocation; srun forwards its stdin."""
        hostname = self.hostnames[index]
        local, self.addresses[index] = route_to(hostname)
        self.local_address = self.local_address or local
        address = self.controller.address_on(local)
        env = {
            **agent_base_env(copied_env(launcher.copy_env_vars, launcher.extra_env_vars)),
            **{k: v for k, v in os.environ.items() if k.startswith("SLURM")},
        }
        srun = [
            "srun", "--nodes=1", "--ntasks=1", f"--nodelist={hostname}",
            "--overlap",  # beside the batch step and the other agents, on the same CPUs
            "--quiet", "--kill-on-bad-exit=1", "--input=0",
        ]  # fmt: skip
        return self._spawn(hostname, srun, env, address, launcher)

    def _spawn(
        self,
        hostname: str,
        prefix: list[str],
        env: dict[str, str],
        address: str,
        launcher: Launcher,
    ) -> AgentHandle:
        """An agent as our child process (``prefix``, e.g. srun, may run it elsewhere)."""
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "torchrunx"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=Path.cwd(),
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not the agent's
        )
        agent = AgentHandle(hostname, process)
        self._boot(agent, address, launcher)
        return agent

    def _boot(self, agent: AgentHandle, address: str, launcher: Launcher) -> None:
        """Register the agent, then send its first line of stdin (which then stays open)."""
        self.controller.call_and_wait(functools.partial(self.controller.add_agent, agent))
        boot = {
            "address": address,
            "identity": agent.identity.hex(),
            "secret": self.secret,
            "hostname": agent.hostname,
            "agent_timeout": launcher.agent_timeout,
            "env_file": None if launcher.env_file is None else os.fspath(launcher.env_file),
            "server_key": self.controller.server_key,
        }
        stdin = agent.process.stdin
        assert stdin is not None  # noqa: S101 -- narrows the type: stdin is a pipe or channel
        try:
            stdin.write(json.dumps(boot).encode() + b"\n")
            stdin.flush()
        except OSError as e:  # it exited at once: say why, if its exit status tells
            try:
                code = agent.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            why = None if code is None else agent.explain_exit(code)
            msg = why or f"the agent on {agent.hostname} could not be started ({e}; exit {code})"
            raise RuntimeError(msg) from e

    def host_address(self, index: int) -> str:
        """Where the other hosts reach host ``index`` (its workers bind there)."""
        if not is_local(self.hostnames[index]):
            return self.addresses[index]
        return self.local_address or "127.0.0.1"

    def stop_agents(self) -> None:
        """Stop every agent (bounded); the next run starts them again."""
        with self.lock:
            for i, agent in enumerate(self.agents):
                if agent is not None:
                    _stop_agent(agent)
                    self.agents[i] = None

    def submit(
        self,
        launcher: Launcher,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        view: tuple[list[str], int | list[int] | str] | None = None,
    ) -> RunHandle[Any]:
        """Start a run on every host (or on ``view``'s hosts and worker counts); don't wait."""
        hostnames, spec = view or (self.hostnames, launcher.workers_per_host)
        indexes = [self.hostnames.index(h) for h in hostnames]
        agents = [a for a in (self.agents[i] for i in indexes) if a is not None]
        workers = _workers_per_host(spec, agents)
        backend = _backend(launcher.backend, agents)
        payload = serialization.dumps((func, args, kwargs))
        env = copied_env(launcher.copy_env_vars, launcher.extra_env_vars)
        run_id = uuid.uuid4().hex[:12]
        handlers = _handlers(launcher, hostnames, workers)
        run = RunState(run_id, agents, workers, _dispatch(handlers), secrets.token_hex(16))
        offsets = [0, *itertools.accumulate(workers)]
        common = {
            "run": run_id,
            "world_size": offsets[-1],
            "backend": backend,
            "master_addr": self.host_address(indexes[0]),
            "env": env,
            "cwd": str(Path.cwd()),
            "sys_path": sys.path,
            "worker_timeout": launcher.worker_timeout,
            "result_token": run.result_token,
            "log_level": log_level_from_env(),
            "server_key": self.controller.server_key,
        }
        messages = [
            (
                {
                    **common,
                    "group_rank": g,
                    "address": self.host_address(i),
                    "local_world_size": n,
                    "workers": [{"rank": offsets[g] + r, "local_rank": r} for r in range(n)],
                },
                payload,
            )
            for g, (i, n) in enumerate(zip(indexes, workers, strict=True))
        ]
        handle: RunHandle[Any] = RunHandle(
            run_id,
            functools.partial(
                self.controller.call,
                functools.partial(self.controller.cancel_run, run_id, "cancelled in the launcher"),
            ),
            run.done,
        )

        def outcome() -> LaunchResult[Any]:
            if run.failures:
                raise_failure(run, hostnames)
            return LaunchResult(
                {
                    host: [unpickle_result(run, offsets[g] + r, host) for r in range(workers[g])]
                    for g, host in enumerate(hostnames)
                }
            )

        def finish() -> None:
            for handler in handlers:
                handler.close()
            handle.settle(outcome)

        # settled on a thread of its own: unpickling and the user's done-callbacks must neither
        # hold up the controller thread nor wait behind another run
        run.on_done = lambda: threading.Thread(
            target=finish, name=f"torchrunx-run-{run_id}", daemon=True
        ).start()
        self.handles.add(handle)
        self.controller.call(functools.partial(self.controller.start_run, run, messages))
        return handle

    def close(self) -> None:
        """Cancel the runs in flight, stop every agent and the controller."""
        for handle in list(self.handles):
            handle.cancel()
        self._finalizer()


def _close_pool(controller: Controller, agents: list[AgentHandle | None]) -> None:
    """Stop every agent (bounded) and the controller; safe at interpreter exit."""
    for agent in agents:
        if agent is not None:
            _stop_agent(agent)
    controller.stop()


def _stop_agent(agent: AgentHandle, timeout: float = 5.0) -> None:
    """Cut the agent's lifeline (it kills its runs and exits), then make sure it is gone."""
    process = agent.process
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _uses_srun(launcher: Launcher) -> bool:
    if launcher.agent_start == "auto":
        return in_slurm_job() and shutil.which("srun") is not None
    return launcher.agent_start == "srun"


def _workers_per_host(spec: int | list[int] | str, agents: list[AgentHandle]) -> list[int]:
    facts = [a.facts or {} for a in agents]
    if isinstance(spec, int):
        return [spec] * len(agents)
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if spec == "cpu":
        return [int(f["cpus"]) for f in facts]
    gpus = [int(f["gpus"]) for f in facts]
    if spec == "gpu":
        missing = [a.hostname for a, g in zip(agents, gpus, strict=True) if g == 0]
        if missing:
            msg = f'workers_per_host="gpu", but no GPU was found on {missing}'
            raise ValueError(msg)
        return gpus
    return [g or 1 for g in gpus]


def _backend(backend: str | None, agents: list[AgentHandle]) -> str | None:
    if backend != "auto":
        return backend
    return "nccl" if all((a.facts or {}).get("gpus") for a in agents) else "gloo"


def _handlers(
    launcher: Launcher, hostnames: list[str], workers: list[int]
) -> list[logging.Handler]:
    factory = launcher.handler_factory
    if factory is None:
        return []
    if factory == "auto":
        r = launcher.live_ranks
        live = None if r == "all" else [r] if isinstance(r, int) else list(r)
        return default_handlers(hostnames, workers, launcher.log_dir, live)
    handlers = factory()
    if not isinstance(handlers, list) or not all(isinstance(h, logging.Handler) for h in handlers):
        msg = f"handler_factory() must return a list of logging.Handler, got {handlers!r}"
        raise TypeError(msg)
    return handlers


def _dispatch(handlers: list[logging.Handler]) -> Callable[[list[logging.LogRecord]], None]:
    return functools.partial(emit_batch, handlers)
