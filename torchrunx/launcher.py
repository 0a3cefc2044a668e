"""Launcher: the user's entry point. Configures hosts and workers, keeps agents, runs functions.

::

    launcher.run(fn, *args, **kwargs)
      │ start agents once (first run, start(), or `with`) ─► hello: host facts
      │ resolve workers per host and backend from the facts
      │ pickle (fn, args, kwargs) once ─► run ─► every agent ─► forkserver ─► fresh workers
      ◄─ results / the first failure, raised as what it was ◄─ cleared (nothing of the run left)

Agents stay up across runs and die with the launcher: ``close()``, the end of a ``with`` block,
garbage collection, interpreter exit, or -- whatever kills this process -- EOF on their stdin.
"""

from __future__ import annotations

__all__ = ["Launcher", "launch"]

import functools
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

from . import console
from .call import pickled_call
from .environment import DEFAULT_ENV_VARS_FOR_COPY, copied_env
from .errors import AgentFailedError, WorkerFailedError
from .hosts import in_slurm_job, resolve_hostnames, slurm_job_vars
from .logs import HandlerFactory, default_handlers, log_folder
from .pool import AgentPool, AgentsConfig
from .preemption import UNFIT, signal_numbers
from .runs import CANCEL_TIMEOUT_S, Run, RunOptions, cancel_reporting, workers_per_host
from .stacks import STACK_SIGNAL
from .sweep import Sweep, SweepSlots
from .transport.messages import HEARTBEAT_INTERVAL_S, DebugSettings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import TypeAlias

    from typing_extensions import Self

    from .result import LaunchResult
    from .runs import RunHandle, Statuses
    from .transport.messages import Devices

    _MaybePool: TypeAlias = AgentPool | None
else:
    # CLI builders (tyro) evaluate the annotation of every field, init=False ones too, and the
    # pool's types are not theirs to parse: at runtime the annotation says nothing
    _MaybePool = Any

FunctionP = ParamSpec("FunctionP")
FunctionR = TypeVar("FunctionR")
ItemT = TypeVar("ItemT")

logger = logging.getLogger("torchrunx")

_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "auto")
_WORKER_COUNTS = ("cpu", "gpu", "auto")


@dataclass
class Launcher:
    """Where and how to run a function as one PyTorch distributed job.

    A launcher starts its agents (one per host) at the first run and keeps them for the next;
    close() (or a with block) stops them.
    """

    hostnames: list[str] | Literal["auto", "slurm"] = "auto"
    """Hosts to run on. "auto": the SLURM allocation's nodes, else ["localhost"]."""
    workers_per_host: int | list[int] | Literal["cpu", "gpu", "auto"] = "auto"
    """Workers per host: a number, one per host, or counted on each host: "gpu", "cpu",
    "auto" (the GPUs, or 1 without GPUs)."""
    ssh_config_file: str | Path | None = None
    """SSH config for reaching hosts. By default ~/.ssh/config, then /etc/ssh/ssh_config."""
    backend: Literal["nccl", "gloo", "mpi", "ucc", "auto"] | None = "auto"
    """Backend of the workers' process group: "auto" is NCCL with GPUs, else Gloo. None:
    no process group (MASTER_ADDR/MASTER_PORT are still set)."""
    worker_timeout: int = 600
    """Timeout of the workers' process group, in seconds."""
    agent_timeout: int = 180
    """Seconds an agent may take to start (SSH, its interpreter, its hello) before it is
    declared failed; on its host, how long it waits for a silent launcher before it clears the
    host. A started agent's silence is heartbeat_timeout's."""
    copy_env_vars: tuple[str, ...] = DEFAULT_ENV_VARS_FOR_COPY
    """Launcher environment variables to copy to agents and workers (fnmatch patterns)."""
    extra_env_vars: dict[str, str] | None = None
    """More environment variables for agents and workers; override copied ones."""
    env_file: str | Path | None = None
    """A file that each agent's shell sources before the agent starts; it has the last word."""
    log_dir: str | Path | None = None
    """Folder for log files (one folder per run); "" writes none. By default
    $TORCHRUNX_LOG_DIR, else ./torchrunx_logs."""
    agent_start: Literal["auto", "ssh", "srun"] = "auto"
    """How agents start on other hosts: "ssh", or "srun" (a job step on each node of
    the SLURM allocation, for clusters without SSH between nodes). "auto": srun inside an
    allocation when srun is there, else SSH."""
    encrypt: bool = False
    """Encrypt the control plane (CURVE), for networks you do not trust. Authentication is
    always on; encryption costs throughput (results: 0.33 GiB/s instead of 1.33 here)."""
    live_ranks: int | list[int] | Literal["all"] = 0
    """Ranks whose output is shown live on the terminal: one, a list, or "all"."""
    debug_ranks: int | list[int] | Literal["all"] = "all"
    """Ranks whose breakpoint() opens pdb in this terminal: one, a list, or "all". The
    others skip theirs. Without a terminal (stdin not a TTY) every rank skips them, with a
    warning."""
    post_mortem: bool = False
    """An exception in the function first opens pdb where it was raised, in this terminal."""
    preload: tuple[str, ...] = ()
    """Modules each host imports once, before forking the workers of the first run (e.g.
    ("transformers",)): no run pays for their import."""
    learn_preload: bool = True
    """Also preload what earlier runs imported from installed packages, in the background, for
    later runs with the same environment (see the guide "Sweeps")."""
    sync_dir: bool | str | Path = False
    """Copy a folder to the hosts reached over SSH, for hosts that do not share this one's
    filesystem: True for the working directory, or a folder. Agents and workers run in the
    host's copy, with it first on sys.path; before each run, only what changed is sent."""
    sync_exclude: tuple[str, ...] = ()
    """What of sync_dir stays here, as gitignore patterns, beside the defaults (.git,
    virtual environments, __pycache__, the log folder, ...; see torchrunx.sync)."""
    python: str | dict[str, str] | None = None
    """The Python that runs agents and workers on hosts reached over SSH (or srun): one path for
    every host, or one per hostname. None: the launcher's own sys.executable."""
    preempt_signals: tuple[str, ...] = ("SIGTERM",)
    """Signals that mean "you are being preempted" (by name, e.g. "SIGUSR1" for SLURM's
    --signal), wherever they arrive: this process, an agent, or every process of a host.
    None of them kills anything: every rank's torchrunx.preempted() turns True, and the run
    has preempt_grace seconds to return. (): signals end processes as they would."""
    preempt_grace: float = 20.0
    """Seconds the ranks have, after a preemption notice, to reach a checkpoint and return
    before they are torn down; a second signal at the same place ends it at once. 20 s: within
    Kubernetes' default 30 s before SIGKILL, with room to tear down and exit."""
    max_restarts: int = 0
    """Times a failed run is run again on fresh workers (the same agents, warm) when its failure
    is one of restart_on. Workers find the attempt in TORCHRUNX_RESTART_COUNT (and
    TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, as torchrun sets them)."""
    restart_on: tuple[type[BaseException], ...] = (WorkerFailedError, AgentFailedError)
    """The failures that restart a run: by default a worker's death and an agent's loss. An
    exception raised by the function is a bug that fails the same way again: name its type to
    restart on it anyway. A preemption is never restarted."""
    spares: int = 0
    """The last spares of hostnames are standby hosts: their agents start with the others
    and stay warm, without ranks. When a host is lost (its agent died, went silent, or its
    connection dropped), the restart (max_restarts) gives its ranks to a spare, and the lost
    host is tried again in the background at each later run: once it answers, it is a spare."""
    heartbeat_timeout: float = 10.0
    """Seconds a started agent may be silent (it sends a heartbeat every second) before its
    host is declared lost: a partitioned host is found within this. Never more than
    agent_timeout."""
    requeue: bool = False
    """Inside a SLURM job: once a preempted run has ended, requeue the job (scontrol
    requeue), so that a job warned of its time limit (--signal) starts again, as one
    preempted by a partition is requeued by SLURM itself."""
    standby: bool = True
    """Once a run has ended, fork the next run's workers and make their process group, so
    that a later run of the same hosts, workers and environment only sends its function. They
    are fresh processes no run has touched; they use no CPU while they wait, and hold their
    memory (and, with GPUs, a CUDA context each). False: every run forks its workers."""

    handler_factory: HandlerFactory | Literal["auto"] | None = field(
        default="auto", init=False, repr=False
    )
    _pool: _MaybePool = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check every field now, not at the first run."""
        _validate(self)

    # ---- lifetime

    def start(self) -> Self:
        """Start the agents (if not already up); ``run`` does this itself."""
        self._ensure_agents()
        return self

    def _ensure_agents(self) -> AgentPool:
        _validate(self)
        hostnames = resolve_hostnames(self.hostnames)
        _check_hostnames(hostnames, self.workers_per_host)
        if self.spares >= len(hostnames):
            msg = f"spares={self.spares} of the hosts {hostnames}: leave one to run on"
            raise ValueError(msg)
        config = AgentsConfig(
            hostnames=tuple(hostnames),
            ssh_config_file=None if self.ssh_config_file is None else str(self.ssh_config_file),
            env_file=None if self.env_file is None else os.fspath(self.env_file),
            agent_timeout=self.agent_timeout,
            encrypt=self.encrypt,
            agent_start=self.agent_start,
            preload=tuple(self.preload),
            learn_preload=self.learn_preload,
            sync_dir=_sync_dir(self.sync_dir),
            sync_exclude=tuple(self.sync_exclude) + _log_folder_in(self.sync_dir, self.log_dir),
            pythons=_pythons(self.python, hostnames),
            preempt_signals=tuple(self.preempt_signals),
            preempt_grace=float(self.preempt_grace),
            requeue=self.requeue,
            heartbeat_timeout=float(self.heartbeat_timeout),
            spares=self.spares,
        )
        if self._pool is not None and self._pool.config != config:
            self.close()
        if self._pool is None:
            self._pool = AgentPool(config, owner=self)
        env = copied_env(self.copy_env_vars, self.extra_env_vars)
        self._pool.ensure_agents(env)
        self._pool.revive_lost(env)
        return self._pool

    def close(self) -> None:
        """Stop the agents and every process they run. Idempotent."""
        pool, self._pool = self._pool, None
        for sweep in list(pool.sweeps if pool is not None else ()):  # none may start a run again
            sweep.close("closed with the launcher")
        if pool is not None:
            pool.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_logging_handlers(
        self, handler_factory: HandlerFactory | Literal["auto"] | None
    ) -> Self:
        """Replace the default handlers of worker and agent output.

        ``handler_factory()`` is called at each run and returns ``logging.Handler`` objects;
        records carry ``hostname`` and ``local_rank`` (``None`` for agents). ``None``: no output
        is handled. ``"auto"``: the defaults.
        """
        if (
            handler_factory is not None
            and handler_factory != "auto"
            and not callable(handler_factory)
        ):
            msg = f"handler_factory must be callable, 'auto' or None, not {handler_factory!r}"
            raise TypeError(msg)
        self.handler_factory = handler_factory
        return self

    # ---- runs

    def run(
        self,
        func: Callable[FunctionP, FunctionR],
        *args: FunctionP.args,
        **kwargs: FunctionP.kwargs,
    ) -> LaunchResult[FunctionR]:
        """Run ``func(*args, **kwargs)`` on every worker and return what each returned.

        The same as ``submit(func, *args, **kwargs).result()``; Ctrl-C cancels the run.

        Raises:
            Exception: what a worker's ``func`` raised, as its own type (remote traceback as
                ``__cause__``, host and rank in ``__notes__``).
            WorkerFailedError: a worker died without a result, or its result cannot be pickled.
            AgentFailedError: an agent died, went silent, or could not start.
        """
        handle = self.submit(func, *args, **kwargs)
        try:
            return _wait(handle)
        except Exception as e:  # noqa: BLE001 -- raised again, as it is
            # the user's run() line and this one, not the way the error came here: the
            # workers' traceback is its __cause__
            raise e.with_traceback(None)  # noqa: B904 -- the same error, not another

    def submit(
        self,
        func: Callable[FunctionP, FunctionR],
        *args: FunctionP.args,
        **kwargs: FunctionP.kwargs,
    ) -> RunHandle[FunctionR]:
        """Start ``func(*args, **kwargs)`` on every worker and return at once.

        The handle is a ``concurrent.futures.Future`` of the ``LaunchResult``. Runs of one
        launcher run side by side, each with its own process group; ``cancel()`` ends one.
        """
        return self._submit(func, args, kwargs, None)

    def view(
        self,
        hostnames: list[str] | None = None,
        workers_per_host: int | list[int] | Literal["cpu", "gpu", "auto"] | None = None,
    ) -> LauncherView:
        """Runs on some of this launcher's hosts, with their own worker counts, on its agents.

        ``launcher.view(["node1"], 1).run(evaluate, model)`` starts no agent: it uses the warm
        ones. ``None`` keeps the launcher's own value.
        """
        hosts = resolve_hostnames(self.hostnames)
        chosen = hosts[: len(hosts) - self.spares] if hostnames is None else list(hostnames)
        unknown = [h for h in chosen if h not in hosts]
        if unknown or not chosen:
            msg = f"view(hostnames={hostnames!r}): choose one or more of the launcher's {hosts}"
            raise ValueError(msg)
        workers = self.workers_per_host if workers_per_host is None else workers_per_host
        if workers_per_host is None and isinstance(workers, (list, tuple)):
            workers = [workers[hosts.index(h)] for h in chosen]
        _check_workers(workers)
        _check_hostnames(chosen, workers)
        return LauncherView(self, chosen, workers)

    def sweep(
        self,
        func: Callable[[ItemT], FunctionR],
        items: Iterable[ItemT],
        workers: int = 1,
        *,
        progress: bool | None = None,
    ) -> Sweep[ItemT, FunctionR]:
        """Run ``func(item)`` for every item, each as a run of ``workers`` ranks, side by side.

        As many runs go at once as the hosts' slots allow (``workers_per_host`` each; a run
        takes ``workers`` slots of one host), the rest wait in a queue. Each run sees only its
        own GPUs (``CUDA_VISIBLE_DEVICES``) or, on hosts without, its own cores. Returns at once:
        iterate the ``Sweep`` for ``(item, outcome)`` as runs end, or call its
        ``outcomes()`` for the items' order; an outcome is the run's ``LaunchResult`` or the
        exception ``run()`` would raise. ``progress``: a bar (or a line per item without a
        terminal); ``None``: on.
        """
        chosen = list(items)
        if not chosen:
            msg = "sweep(items=[]): give one item or more"
            raise ValueError(msg)
        pickled_call(func, (chosen[0],), {})  # a wrong signature fails here, before any start
        pool = self._ensure_agents()
        hostnames = list(pool.roster.in_use)
        _, agents = pool.agents_of(hostnames)
        capacity = dict(
            zip(hostnames, workers_per_host(self.workers_per_host, agents), strict=True)
        )
        _check_sweep_workers(workers, capacity)

        def start(item: ItemT, host: str, devices: Devices, label: str) -> RunHandle[Any]:
            return self._submit(func, (item,), {}, ([host], workers), devices, label)

        slots = SweepSlots(capacity, start, lambda: pool.controller.preemption is not None)
        sweep: Sweep[ItemT, FunctionR] = Sweep(chosen, workers, slots, progress=progress)
        pool.sweeps.add(sweep)
        return sweep

    def _submit(  # noqa: PLR0913, PLR0917 -- a view's and a sweep's runs too
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        view: tuple[list[str], int | list[int] | str] | None,
        devices: Devices | None = None,
        label: str = "",
    ) -> RunHandle[Any]:
        payload = pickled_call(func, args, kwargs)  # a wrong call fails here, before any start
        pool = self._ensure_agents()
        hostnames, workers = view or (list(pool.roster.in_use), self.workers_per_host)
        if view is None and isinstance(workers, (list, tuple)):  # by place: a spare takes its
            workers = list(workers[: len(hostnames)])  # host's entry
        options = RunOptions(
            hostnames=hostnames,
            workers_per_host=workers,
            backend=self.backend,
            worker_timeout=self.worker_timeout,
            # inside a SLURM job, its id and attempt (a requeued job's restart count) too
            env={**slurm_job_vars(), **copied_env(self.copy_env_vars, self.extra_env_vars)},
            # not a bound method: the run must not keep this launcher alive (its finalizer
            # stops the agents when the user drops it)
            handlers=functools.partial(
                _handlers, self.handler_factory, self.live_ranks, self.log_dir, label=label
            ),
            debug=DebugSettings(
                terminal=_has_terminal(),
                ranks=None if self.debug_ranks == "all" else _ranks(self.debug_ranks),
                post_mortem=self.post_mortem,
            ),
            max_restarts=self.max_restarts,
            restart_on=tuple(self.restart_on),
            devices=devices,
            keep_standby=self.standby and view is None and devices is None,
        )
        pool.standby.others_yield()  # another launcher's standby workers hold memory: not now
        ready = pool.standby.take(options, payload) if options.keep_standby else None
        return ready or Run.submit(pool, payload, options)

    def standby_status(self, timeout: float = 5.0) -> Statuses | None:
        """The standby workers (see ``standby``): their hosts, pids, memory, GPU memory.

        Their ``state`` is ``"standby"`` once ready. None: there are none now.
        """
        return None if self._pool is None else self._pool.standby.status(timeout)


@dataclass(frozen=True)
class LauncherView:
    """Some of a launcher's hosts and worker counts; its runs share the launcher's agents."""

    launcher: Launcher
    hostnames: list[str]
    workers_per_host: int | list[int] | str

    def run(
        self,
        func: Callable[FunctionP, FunctionR],
        *args: FunctionP.args,
        **kwargs: FunctionP.kwargs,
    ) -> LaunchResult[FunctionR]:
        """As ``Launcher.run()``, on this view's hosts."""
        handle = self.submit(func, *args, **kwargs)
        try:
            return _wait(handle)
        except Exception as e:  # noqa: BLE001 -- raised again, as it is
            # the user's run() line and this one, not the way the error came here: the
            # workers' traceback is its __cause__
            raise e.with_traceback(None)  # noqa: B904 -- the same error, not another

    def submit(
        self,
        func: Callable[FunctionP, FunctionR],
        *args: FunctionP.args,
        **kwargs: FunctionP.kwargs,
    ) -> RunHandle[FunctionR]:
        """As ``Launcher.submit()``, on this view's hosts."""
        view = (self.hostnames, self.workers_per_host)
        return self.launcher._submit(func, args, kwargs, view)  # noqa: SLF001 -- its own view


def _handlers(  # noqa: PLR0913 -- the launcher's three fields, the run's two, a label
    factory: HandlerFactory | Literal["auto"] | None,
    live_ranks: int | list[int] | Literal["all"],
    log_dir: str | Path | None,
    hostnames: list[str],
    workers: list[int],
    *,
    label: str = "",
) -> list[logging.Handler]:
    """A run's log handlers: the user's factory, the defaults, or none."""
    if factory is None:
        return []
    if factory == "auto":
        live = None if live_ranks == "all" else _ranks(live_ranks)
        return default_handlers(hostnames, workers, log_dir, live, label)
    handlers = factory()
    if not isinstance(handlers, list) or not all(isinstance(h, logging.Handler) for h in handlers):
        msg = f"handler_factory() must return a list of logging.Handler, got {handlers!r}"
        raise TypeError(msg)
    return handlers


def _wait(handle: RunHandle[FunctionR]) -> LaunchResult[FunctionR]:
    try:
        return handle.result()
    except KeyboardInterrupt:
        if handle.done() or not console.shared().quit_at_prompt(handle.run_id):
            cancel_reporting(handle)
            raise
    except BaseException:
        cancel_reporting(handle)
        raise
    # Ctrl-C at a debugger prompt of this run: it ends as a "q" there does
    try:
        return handle.result(timeout=CANCEL_TIMEOUT_S)
    finally:
        cancel_reporting(handle)


def launch(  # noqa: PLR0913 -- the public signature of earlier releases
    func: Callable[..., FunctionR],
    func_args: Sequence[Any] = (),
    func_kwargs: dict[str, Any] | None = None,
    *,
    logs: str | os.PathLike[str] | None = None,
    env_vars: tuple[str, ...] | None = None,
    handler_factory: HandlerFactory | Literal["auto"] | None = "auto",
    **launcher_fields: Any,
) -> LaunchResult[FunctionR]:
    """One call: make a ``Launcher`` from ``launcher_fields``, run ``func`` once, close.

    ``logs`` and ``env_vars`` are the older names of ``log_dir`` and ``copy_env_vars``.
    """
    if logs is not None:
        launcher_fields.setdefault("log_dir", logs)
    if env_vars is not None:
        launcher_fields.setdefault("copy_env_vars", env_vars)
    with Launcher(**launcher_fields).set_logging_handlers(handler_factory) as launcher:
        return launcher.run(func, *func_args, **(func_kwargs or {}))


# ---- validation


def _validate(launcher: Launcher) -> None:
    _check_hostnames_field(launcher.hostnames, launcher.workers_per_host)
    _check_workers(launcher.workers_per_host)
    if launcher.backend is not None and launcher.backend not in _BACKENDS:
        msg = f"backend={launcher.backend!r}: use one of {_BACKENDS} or None"
        raise ValueError(msg)
    for name in ("worker_timeout", "agent_timeout", "heartbeat_timeout"):
        value = getattr(launcher, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            msg = f"{name}={value!r}: use a positive number of seconds"
            raise ValueError(msg)
    if launcher.heartbeat_timeout < 3 * HEARTBEAT_INTERVAL_S:
        msg = (
            f"heartbeat_timeout={launcher.heartbeat_timeout!r}: use {3 * HEARTBEAT_INTERVAL_S:g} "
            f"s or more (heartbeats come every {HEARTBEAT_INTERVAL_S:g} s: less would lose busy "
            "hosts that are fine)"
        )
        raise ValueError(msg)
    _check_environment(launcher)
    if launcher.agent_start not in ("auto", "ssh", "srun"):
        msg = f'agent_start={launcher.agent_start!r}: use "auto", "ssh" or "srun"'
        raise ValueError(msg)
    if launcher.agent_start == "srun" and not in_slurm_job():
        msg = 'agent_start="srun" needs a SLURM allocation, but SLURM_JOB_ID is not set'
        raise ValueError(msg)
    _check_ranks(launcher)
    for name in ("encrypt", "post_mortem", "learn_preload"):
        if not isinstance(getattr(launcher, name), bool):
            msg = f"{name}={getattr(launcher, name)!r}: use True or False"
            raise TypeError(msg)
    _check_preload(launcher.preload)
    _check_sync(launcher.sync_dir, launcher.sync_exclude)
    _check_python(launcher.python)
    _check_preemption(launcher)
    _check_restarts(launcher)
    _check_spares(launcher)


def _check_preemption(launcher: Launcher) -> None:
    names = launcher.preempt_signals
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        msg = f"preempt_signals={names!r}: use a tuple of signal names, e.g. ('SIGTERM',)"
        raise TypeError(msg)
    signal_numbers(names)  # names only signals
    unfit = [n for n in names if n in UNFIT or signal.Signals[n] == STACK_SIGNAL]
    if unfit:
        msg = (
            f"preempt_signals: {unfit[0]} cannot be a preemption notice (it cannot be caught, "
            "is Ctrl-C's, a crash's, or torchrunx's own): use e.g. SIGTERM, SIGUSR1, SIGUSR2"
        )
        raise ValueError(msg)
    grace = launcher.preempt_grace
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        msg = f"preempt_grace={grace!r}: use a number of seconds, 0 or more"
        raise ValueError(msg)
    if not isinstance(launcher.requeue, bool):
        msg = f"requeue={launcher.requeue!r}: use True or False"
        raise TypeError(msg)


def _check_spares(launcher: Launcher) -> None:
    n, hosts = launcher.spares, launcher.hostnames
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        msg = f"spares={n!r}: use a whole number of hosts, 0 or more"
        raise ValueError(msg)
    if isinstance(hosts, (list, tuple)) and n >= len(hosts):
        msg = f"spares={n} of {len(hosts)} hostnames: leave at least one host to run on"
        raise ValueError(msg)


def _check_restarts(launcher: Launcher) -> None:
    n = launcher.max_restarts
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        msg = f"max_restarts={n!r}: use a whole number, 0 or more"
        raise ValueError(msg)
    on = launcher.restart_on
    if not isinstance(on, (tuple, list)) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in on
    ):
        msg = (
            f"restart_on={on!r}: use a tuple of exception types, "
            "e.g. (torchrunx.WorkerFailedError, torchrunx.AgentFailedError)"
        )
        raise TypeError(msg)


def _check_sync(sync_dir: object, exclude: object) -> None:
    if not isinstance(sync_dir, (bool, str, os.PathLike)) or (
        not isinstance(sync_dir, bool) and not Path(sync_dir).is_dir()
    ):
        msg = f"sync_dir={sync_dir!r}: use True (the working directory), False, or a folder"
        raise ValueError(msg)
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(x, str) for x in exclude):
        msg = (
            f'sync_exclude={exclude!r}: use a list of gitignore patterns, e.g. ["data/", "*.ckpt"]'
        )
        raise ValueError(msg)


def _check_python(python: object) -> None:
    one = isinstance(python, str) and python.strip() != ""
    each = isinstance(python, dict) and all(
        isinstance(h, str) and isinstance(p, str) and p.strip() for h, p in python.items()
    )
    if python is not None and not (one or each):
        msg = (
            f"python={python!r}: use the path of a Python on the hosts, or one per hostname "
            '(e.g. {"node1": "/opt/venv/bin/python"}), or None for the launcher\'s own'
        )
        raise ValueError(msg)


def _sync_dir(sync_dir: bool | str | Path) -> str | None:
    """The folder to copy, resolved; None: none."""
    if sync_dir is False:
        return None
    return str(Path.cwd() if sync_dir is True else Path(sync_dir).resolve())


def _log_folder_in(sync_dir: bool | str | Path, log_dir: str | Path | None) -> tuple[str, ...]:
    """The log folder, as a pattern anchored in the copied folder, if it is in there."""
    root = _sync_dir(sync_dir)
    if root is None:
        return ()
    logs = log_folder(log_dir)
    if str(logs) == "":
        return ()
    try:
        rel = Path(logs).resolve().relative_to(root)
    except ValueError:
        return ()
    return (f"/{rel.as_posix()}/",) if rel.parts else ()


def _pythons(
    python: str | dict[str, str] | None, hostnames: list[str]
) -> tuple[tuple[str, str], ...]:
    """Each host's chosen Python; a name the launcher does not run on is a mistake: say so."""
    if python is None:
        return ()
    if isinstance(python, str):
        return tuple((h, python) for h in hostnames)
    unknown = sorted(set(python) - set(hostnames))
    if unknown:
        msg = f"python names hosts {unknown} that are not among the launcher's {hostnames}"
        raise ValueError(msg)
    return tuple(python.items())


def _check_ranks(launcher: Launcher) -> None:
    for name in ("live_ranks", "debug_ranks"):
        r = getattr(launcher, name)
        if r != "all" and not all(_is_rank(x) for x in _ranks(r)):
            msg = f'{name}={r!r}: use a rank (int >= 0), a list of ranks, or "all"'
            raise ValueError(msg)


def _check_preload(preload: object) -> None:
    if not isinstance(preload, (list, tuple)) or not all(
        isinstance(n, str) and n and all(part.isidentifier() for part in n.split("."))
        for n in preload
    ):
        msg = f'preload={preload!r}: use a list of module names, e.g. ["transformers"]'
        raise ValueError(msg)


def _is_rank(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _ranks(r: object) -> tuple[int, ...]:
    """``3`` or ``[0, 3]`` as a tuple of ranks (anything else: a tuple that fails the checks)."""
    if _is_rank(r):
        return (cast("int", r),)
    return tuple(r) if isinstance(r, (list, tuple)) else (cast("int", r),)


def _has_terminal() -> bool:
    """Whether a person can answer a prompt here: stdin is a terminal."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def _check_hostnames_field(h: object, workers_per_host: object) -> None:
    if isinstance(h, str):
        if h not in ("auto", "slurm"):
            msg = f'hostnames={h!r}: use "auto", "slurm" or a list of hostnames'
            raise ValueError(msg)
    elif not isinstance(h, (list, tuple)) or not all(isinstance(x, str) and x for x in h):
        msg = f'hostnames={h!r}: use "auto", "slurm" or a list of non-empty hostname strings'
        raise TypeError(msg)
    elif len(h) == 0:
        msg = "hostnames=[]: give at least one hostname"
        raise ValueError(msg)
    else:
        _check_hostnames(list(h), workers_per_host)


def _check_environment(launcher: Launcher) -> None:
    c = launcher.copy_env_vars
    if isinstance(c, str) or not all(isinstance(p, str) for p in c):
        msg = f"copy_env_vars={c!r}: use a tuple of fnmatch patterns, e.g. ('PATH', 'CUDA*')"
        raise TypeError(msg)
    e = launcher.extra_env_vars
    if e is not None and not (
        isinstance(e, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in e.items())
    ):
        msg = f"extra_env_vars={e!r}: use a dict of str to str"
        raise TypeError(msg)
    f = launcher.env_file
    if f is not None and not os.path.isfile(f):  # noqa: PTH113
        msg = f"env_file={f!r}: no such file"
        raise ValueError(msg)


def _check_workers(w: object) -> None:
    if isinstance(w, str):
        if w not in _WORKER_COUNTS:
            msg = (
                f"workers_per_host={w!r}: use a positive int, a list of them, or one of "
                f"{_WORKER_COUNTS}"
            )
            raise ValueError(msg)
    elif isinstance(w, bool) or not isinstance(w, (int, list, tuple)):
        msg = (
            f"workers_per_host={w!r}: use a positive int, a list of them, or one of "
            f"{_WORKER_COUNTS}"
        )
        raise TypeError(msg)
    else:
        counts = [w] if isinstance(w, int) else list(w)
        if not counts or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts
        ):
            msg = f"workers_per_host={w!r}: every count must be a positive int"
            raise ValueError(msg)


def _check_hostnames(hostnames: list[str], workers_per_host: object) -> None:
    if len(set(hostnames)) != len(hostnames):
        msg = f"hostnames={hostnames!r}: each host may appear only once"
        raise ValueError(msg)
    if isinstance(workers_per_host, (list, tuple)) and len(workers_per_host) != len(hostnames):
        msg = (
            f"workers_per_host={list(workers_per_host)!r} has {len(workers_per_host)} "
            f"entries for {len(hostnames)} hosts {hostnames!r}"
        )
        raise ValueError(msg)


def _check_sweep_workers(workers: object, capacity: dict[str, int]) -> None:
    most = max(capacity.values())
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= most:
        msg = (
            f"sweep(workers={workers!r}): a run of a sweep takes slots of one host, and the "
            f"hosts have {capacity} (workers_per_host): give a whole number from 1 to {most}"
        )
        raise ValueError(msg)
