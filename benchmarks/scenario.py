"""Run one benchmark scenario in this interpreter and write the result as JSON.

``compare.py`` starts this script with the Python of the implementation under test, once per
scenario (or once per repetition), so two packages named ``torchrunx`` never meet in one
interpreter.

- ``--mode launcher`` imports ``torchrunx`` (whichever package this interpreter finds) and times
  ``Launcher.run``.
- ``--mode torchrun`` times ``python -m torch.distributed.run`` of ``torchrun_worker.py``.

Single-host scenarios use 2 workers on ``localhost`` (``log_*``: 1); the ``multihost_*`` ones use
1 worker on each host given by ``--hosts`` (fake hosts that ``compare.py`` brings up), reached
through the ssh config given by ``--ssh-config``.

The file given by ``--out`` receives the scenario's flat metrics and details, or its error (see
``protocol.py``). Each metric is named after the scenario (``later_run``), or after the scenario
and the part it measures (``first_run.startup``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import importlib
import itertools
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
import workloads
from protocol import (
    EVENT_STAMP,
    HIGHER,
    LOWER,
    MULTIHOST_FIRST_RUN_HOSTS,
    Record,
    failed,
    measured,
    metric,
    multihost_first_run_name,
    write_result,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    from typing_extensions import Self

HERE = Path(__file__).resolve().parent
WORKERS = 2
NUMEL = 64 * 2**20  # float32 elements returned by each worker: 256 MiB
GIB_PER_RUN = WORKERS * NUMEL * 4 / 2**30
SLEEP_S = 2.0  # how long the workers run while the agent's memory is sampled
TORCHRUN_TIMEOUT_S = 300.0
MIB = 2**20
MAX_LEAK_FAILURES = 10  # failed runs that leak_1000 tolerates (and reports) before giving up
LOG_LINES = 200_000  # lines printed by the one worker of log_lines
LOG_HOST = "localhost"  # the log scenarios' only host: its files are <host>.log, <host>[0].log
LINE_INDEX = re.compile(rb"\bline (\d+)$")  # the end of every line that print_lines printed
IN_FLIGHT = (1, 2, 4)  # runs kept in flight by the sweeps of sweep_in_flight
SWEEP_RUNS = 100  # runs per sweep, where the launcher has submit()
SWEEP_RUNS_SEQUENTIAL = 10  # runs per sweep without it (torchrunx 0.4.0: seconds per run)
SLOW_RUN_S = 1.0  # a run of sweep_in_flight that takes this long is counted (a stall)

Result = Record  # what a scenario returns: protocol.measured(...)


# --- launchers ----------------------------------------------------------------------------------


def load_torchrunx() -> Any:
    """Import the ``torchrunx`` package that this interpreter finds (ours or the reference)."""
    return importlib.import_module("torchrunx")


def new_launcher(
    trx: Any, opts: argparse.Namespace | None = None, workers: int = WORKERS, **fields: Any
) -> Any:
    """The launcher of a scenario: ``workers`` on localhost, or 1 on each of ``opts.hosts``."""
    if opts is not None and opts.hosts:
        return trx.Launcher(
            hostnames=opts.hosts,
            workers_per_host=1,
            backend="gloo",
            ssh_config_file=opts.ssh_config,
        )
    return trx.Launcher(hostnames=["localhost"], workers_per_host=workers, backend="gloo", **fields)


def close_launcher(launcher: Any) -> None:
    """Release a launcher's resources, where the implementation has a ``close()``."""
    if hasattr(launcher, "close"):
        launcher.close()


@contextlib.contextmanager
def open_launcher(
    trx: Any, opts: argparse.Namespace | None = None, workers: int = WORKERS, **fields: Any
) -> Iterator[Any]:
    """A launcher (as in :func:`new_launcher`) that is closed on exit."""
    launcher = new_launcher(trx, opts, workers, **fields)
    try:
        yield launcher
    finally:
        close_launcher(launcher)


def timed_run(launcher: Any, fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """Run ``fn`` on the workers; return (seconds, wall-clock time of return, result)."""
    start = time.perf_counter()
    result = launcher.run(fn, *args)
    elapsed = time.perf_counter() - start
    return elapsed, time.time(), result


def check_hosts(launcher: Any, opts: argparse.Namespace) -> list[str]:
    """Run once more (untimed) and check that rank ``i`` ran on host ``i``; return the hosts."""
    result = launcher.run(workloads.hostname)
    seen = [result.rank(r) for r in range(len(opts.hosts))]
    if seen != opts.hosts:
        msg = f"ranks ran on {seen}, not on {opts.hosts}"
        raise RuntimeError(msg)
    return seen


def exception_name(exc: BaseException) -> str:
    """Short name of an exception type."""
    return type(exc).__name__


def exception_detail(exc: BaseException) -> str:
    """Qualified type and message of an exception, shortened."""
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}: {exc}"[:300]


# --- processes ----------------------------------------------------------------------------------


def cmdline(proc: psutil.Process) -> list[str]:
    """Command line of a process, empty where it is gone or unreadable."""
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


def is_agent_command(cmd: list[str]) -> bool:
    """Whether a command line runs an agent: ``python ... -m torchrunx[.agent]``."""
    return any(
        a == "-m" and b in ("torchrunx", "torchrunx.agent") for a, b in itertools.pairwise(cmd)
    )


def find_agents(root: psutil.Process) -> list[psutil.Process]:
    """Agent processes below ``root``: the outermost ones that run ``-m torchrunx``."""
    try:
        below = root.children(recursive=True)
    except psutil.Error:
        return []
    agents = [p for p in below if is_agent_command(cmdline(p))]
    pids = {p.pid for p in agents}
    outermost = []
    for proc in agents:
        with contextlib.suppress(psutil.Error):
            if proc.ppid() not in pids:
                outermost.append(proc)
    return outermost


def rss_mib(procs: list[psutil.Process]) -> float:
    """Summed resident set size in MiB of the processes still alive."""
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / MIB


def describe(proc: psutil.Process) -> dict[str, Any]:
    """Pid, parent, RSS and command line of a process, for the report."""
    info: dict[str, Any] = {"pid": proc.pid, "cmdline": " ".join(cmdline(proc))[:300]}
    with contextlib.suppress(psutil.Error):
        info["ppid"] = proc.ppid()
        info["name"] = proc.name()
        info["rss_mib"] = round(proc.memory_info().rss / MIB, 1)
    return info


def descendants(root: psutil.Process) -> list[psutil.Process]:
    """Living descendants of ``root``."""
    try:
        below = root.children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for proc in below:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                proc.kill()


class RssSampler:
    """Samples the RSS of each process returned by ``find`` in a background thread.

    Samples are kept per process: an agent of a previous run that is still exiting is seen as a
    process of its own, not added to the agent of the current run.
    """

    def __init__(
        self, find: Callable[[], list[psutil.Process]], root: psutil.Process, interval: float = 0.05
    ) -> None:
        self.find = find
        self.root = root
        self.interval = interval
        self.samples: dict[int, list[float]] = {}
        self.described: dict[int, list[dict[str, Any]]] = {}
        self.tree: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            procs = self.find()
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss / MIB
                    self.samples.setdefault(proc.pid, []).append(rss)
                    if proc.pid not in self.described:
                        parent = proc.parent()
                        self.described[proc.pid] = [describe(proc)]
                        if parent is not None:
                            self.described[proc.pid].append(describe(parent))
            if procs:
                tree = descendants(self.root)
                if len(tree) > len(self.tree):
                    self.tree = [describe(p) for p in tree]
            self._stop.wait(self.interval)

    def main_pid(self) -> int:
        """The process sampled longest: the agent of the run that was sampled."""
        if not self.samples:
            msg = "no agent process found (no descendant runs 'python -m torchrunx')"
            raise RuntimeError(msg)
        return max(self.samples, key=lambda pid: len(self.samples[pid]))

    def peak(self) -> float:
        """Highest RSS (MiB) of the main process."""
        return max(self.samples[self.main_pid()])

    def steady(self) -> float:
        """Median RSS (MiB) of the main process."""
        return statistics.median(self.samples[self.main_pid()])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- torchrun -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_torchrun(
    mode: str, workdir: Path, *extra: str, nproc: int = WORKERS, stdout: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``torchrun`` with ``nproc`` local workers running ``torchrun_worker.py MODE``.

    Its output goes to ``torchrun.log`` in ``workdir``; with ``stdout``, its stdout (that of the
    workers included) goes to that file instead.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(HERE / "torchrun_worker.py"),
        mode,
        str(workdir),
        *extra,
    ]
    with (workdir / "torchrun.log").open("ab") as log:
        if stdout is None:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        with stdout.open("wb") as out:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=log)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``proc`` to exit, waking up the moment it does; kill its tree on timeout."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if ready:
                return proc.wait()
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    kill_tree(proc.pid)
    proc.wait()
    msg = f"torchrun did not exit within {timeout:g} s"
    raise TimeoutError(msg)


def log_tail(workdir: Path) -> str:
    """Last line of the torchrun log, for error messages."""
    log = workdir / "torchrun.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else ""


def torchrun_noop(workdir: Path, nproc: int = WORKERS) -> float:
    """Wall time of one complete ``torchrun`` of the noop workload."""
    start = time.perf_counter()
    code = wait_exit(start_torchrun("noop", workdir, nproc=nproc), TORCHRUN_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if code != 0:
        msg = f"torchrun exited with {code}: {log_tail(workdir)}"
        raise RuntimeError(msg)
    return elapsed


# --- scenarios ----------------------------------------------------------------------------------


def first_run(opts: argparse.Namespace) -> Result:
    """Time the first ``Launcher(...).run(noop)`` of a fresh process."""
    if opts.mode == "torchrun":
        return measured([metric(opts.scenario, "s", LOWER, [torchrun_noop(opts.workdir)])])
    trx = load_torchrunx()
    imported = time.time()
    start = time.perf_counter()
    launcher = new_launcher(trx)
    launcher.run(workloads.noop)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    close_launcher(launcher)
    closed = time.perf_counter() - start
    metrics = [
        metric(opts.scenario, "s", LOWER, [elapsed]),
        metric(f"{opts.scenario}.startup", "s", LOWER, [imported - opts.t0]),
    ]
    return measured(metrics, close_s=closed)


def later_run(opts: argparse.Namespace) -> Result:
    """Time noop runs of one launcher after a warm-up run."""
    if opts.mode == "torchrun":
        values = [torchrun_noop(opts.workdir) for _ in range(opts.reps)]
        return measured([metric(opts.scenario, "s", LOWER, values)])
    with open_launcher(load_torchrunx()) as launcher:
        warmup, _, _ = timed_run(launcher, workloads.noop)
        values = [timed_run(launcher, workloads.noop)[0] for _ in range(opts.reps)]
    return measured([metric(opts.scenario, "s", LOWER, values)], warmup_s=warmup)


def failure_latency(
    opts: argparse.Namespace, fn: Callable[[str], None], mode: str, *, noop_first: bool = False
) -> Result:
    """Time from an injected failure on rank 1 to the launcher (or torchrun) reporting it.

    Each repetition has a fresh launcher; with ``noop_first``, it runs a noop before the failing
    run (the failure is its second run). Notes: the type raised (torchrun: its exit code).
    """
    stamp = opts.workdir / EVENT_STAMP
    values: list[float] = []
    raised: list[str] = []
    details: list[str] = []
    trx = None if opts.mode == "torchrun" else load_torchrunx()
    for _ in range(opts.reps):
        stamp.unlink(missing_ok=True)
        if trx is None:
            code = wait_exit(start_torchrun(mode, opts.workdir), TORCHRUN_TIMEOUT_S)
            reported = time.time()
            raised.append(f"exit code {code}")
            details.append(log_tail(opts.workdir)[:300])
        else:
            with open_launcher(trx, opts) as launcher:
                if noop_first:
                    launcher.run(workloads.noop)
                try:
                    launcher.run(fn, str(opts.workdir))
                except Exception as exc:  # noqa: BLE001 - the type raised is what is measured
                    reported = time.time()
                    raised.append(exception_name(exc))
                    details.append(exception_detail(exc))
                else:
                    reported = time.time()
                    raised.append("none (returned)")
                    details.append("")
        if not stamp.exists():
            msg = f"the failure was never injected (raised {raised[-1]}: {details[-1]})"
            raise RuntimeError(msg)
        values.append(reported - workloads.read_stamp(stamp))
    latency = metric(opts.scenario, "s", LOWER, values, notes=raised)
    return measured([latency], raised=raised, details=details)


def sigkill_latency(opts: argparse.Namespace) -> Result:
    """Rank 1 is SIGKILLed; time until ``run()`` raises (or torchrun exits)."""
    return failure_latency(opts, workloads.sigkill_rank1, "sigkill")


def exception_in_barrier(opts: argparse.Namespace) -> Result:
    """Rank 1 raises while rank 0 waits in a barrier; time until ``run()`` raises."""
    return failure_latency(opts, workloads.raise_in_barrier, "raise_in_barrier")


def first_failure(opts: argparse.Namespace) -> Result:
    """A fresh launcher: a noop run, then rank 1 raises 1 s in while rank 0 is in a barrier."""
    fn, mode = workloads.raise_late_in_barrier, "raise_late_in_barrier"
    return failure_latency(opts, fn, mode, noop_first=True)


SETTLING_RUNS = 5  # runs of sweep_big_import between the first and the measured ones


def sweep_big_import(opts: argparse.Namespace) -> Result:
    """Runs of a function that imports transformers (:func:`workloads.gpt2_loss`).

    A launcher: its first run, ``SETTLING_RUNS`` more, then the measured ones (details: the
    first and the settling runs). torchrun: whole runs.
    """
    if opts.mode == "torchrun":
        values = []
        for _ in range(opts.reps):
            start = time.perf_counter()
            code = wait_exit(start_torchrun("gpt2_loss", opts.workdir), TORCHRUN_TIMEOUT_S)
            values.append(time.perf_counter() - start)
            if code != 0:
                msg = f"torchrun exited with {code}: {log_tail(opts.workdir)}"
                raise RuntimeError(msg)
        return measured([metric(opts.scenario, "s", LOWER, values)])
    with open_launcher(load_torchrunx()) as launcher:
        first, _, _ = timed_run(launcher, workloads.gpt2_loss)
        settling = [timed_run(launcher, workloads.gpt2_loss)[0] for _ in range(SETTLING_RUNS)]
        values = [timed_run(launcher, workloads.gpt2_loss)[0] for _ in range(opts.reps)]
    return measured([metric(opts.scenario, "s", LOWER, values)], first_s=first, settling_s=settling)


def check_tensors(result: Any) -> None:
    """Raise unless worker ``r`` returned a float32 tensor of ``NUMEL`` elements equal to r+1."""
    for r in range(WORKERS):
        tensor = result.rank(r)
        ok = (
            isinstance(tensor, torch.Tensor)
            and tuple(tensor.shape) == (NUMEL,)
            and tensor.dtype == torch.float32
            and bool(torch.all(tensor == r + 1))
        )
        if not ok:
            msg = f"rank {r} returned a wrong value: {type(tensor).__name__}"
            raise RuntimeError(msg)


def results_throughput_encrypted(opts: argparse.Namespace) -> Result:
    """As :func:`results_throughput`, with ``encrypt=True`` (CURVE) on our control plane."""
    return results_throughput(opts, encrypt=True)


def results_throughput(opts: argparse.Namespace, **fields: Any) -> Result:
    """GiB/s of returning a 256 MiB tensor from each worker to the launcher."""
    if opts.mode == "torchrun":
        msg = "torchrun does not return results"
        raise RuntimeError(msg)
    values: list[float] = []
    transfer: list[float] = []
    wall: list[float] = []
    with open_launcher(load_torchrunx(), **fields) as launcher:
        timed_run(launcher, workloads.noop)
        noop_s = statistics.median(timed_run(launcher, workloads.noop)[0] for _ in range(3))
        for _ in range(opts.reps):
            for old in opts.workdir.glob("built.*"):
                old.unlink()
            elapsed, returned, result = timed_run(
                launcher, workloads.build_tensor, str(opts.workdir), NUMEL
            )
            check_tensors(result)
            del result
            gc.collect()
            built = max(workloads.read_stamp(opts.workdir / f"built.{r}") for r in range(WORKERS))
            transfer.append(returned - built)
            wall.append(elapsed)
            values.append(GIB_PER_RUN / (returned - built))
    return measured(
        [metric(opts.scenario, "GiB/s", HIGHER, values)],
        gib_per_run=GIB_PER_RUN,
        transfer_s=transfer,
        wall_s=wall,
        noop_s=noop_s,
        gib_per_s_wall_minus_noop=[GIB_PER_RUN / max(w - noop_s, 1e-9) for w in wall],
    )


def sample_torchrun_agent(opts: argparse.Namespace, me: psutil.Process) -> RssSampler:
    """Sample torchrun's own process (its elastic agent) while the workers sleep."""
    proc = start_torchrun("sleep", opts.workdir, str(SLEEP_S))
    agent = psutil.Process(proc.pid)
    with RssSampler(lambda: [agent], me) as sampler:
        code = wait_exit(proc, TORCHRUN_TIMEOUT_S)
    if code != 0:
        msg = f"torchrun exited with {code}: {log_tail(opts.workdir)}"
        raise RuntimeError(msg)
    return sampler


def sample_launcher_agents(opts: argparse.Namespace, me: psutil.Process) -> list[RssSampler]:
    """Sample the agents of one launcher while the workers sleep, after a warm-up run."""
    samplers = []
    with open_launcher(load_torchrunx()) as launcher:
        timed_run(launcher, workloads.noop)
        for _ in range(opts.reps):
            with RssSampler(lambda: find_agents(me), me) as sampler:
                launcher.run(workloads.sleep, SLEEP_S)
            samplers.append(sampler)
    return samplers


def agent_rss(opts: argparse.Namespace) -> Result:
    """Peak and steady RSS of the agent process while the workers sleep."""
    me = psutil.Process()
    if opts.mode == "torchrun":
        samplers = [sample_torchrun_agent(opts, me) for _ in range(opts.reps)]
    else:
        samplers = sample_launcher_agents(opts, me)
    first = samplers[0]
    metrics = [
        metric(opts.scenario, "MiB", LOWER, [s.peak() for s in samplers]),
        metric(f"{opts.scenario}.steady", "MiB", LOWER, [s.steady() for s in samplers]),
    ]
    return measured(
        metrics,
        agents_seen_per_run=[len(s.samples) for s in samplers],
        agent_and_parent=first.described[first.main_pid()],
        other_agents=[d for pid, d in first.described.items() if pid != first.main_pid()],
        process_tree=first.tree,
    )


def snapshot(me: psutil.Process, run: int) -> dict[str, Any]:
    """Resources of the launcher process and its descendants after ``run`` runs."""
    below = descendants(me)
    return {
        "run": run,
        "launcher_fds": me.num_fds(),
        "launcher_threads": me.num_threads(),
        "launcher_rss_mib": round(me.memory_info().rss / MIB, 1),
        "agent_rss_mib": round(rss_mib(find_agents(me)), 1),
        "descendants": [describe(p) for p in below],
    }


def leak_1000(opts: argparse.Namespace) -> Result:
    """Many noop runs on one launcher: leaked processes, fds and memory growth."""
    if opts.mode == "torchrun":
        msg = "not a launcher"
        raise RuntimeError(msg)
    me = psutil.Process()
    count = opts.reps
    first = min(10, count)
    snapshots: dict[int, dict[str, Any]] = {}
    times: list[float] = []
    launcher = new_launcher(load_torchrunx())
    failures: list[str] = []
    for i in range(1, count + 1):
        try:
            times.append(timed_run(launcher, workloads.noop)[0])
        except Exception as exc:
            failures.append(f"run {i}: {exception_name(exc)}: {exc}"[:300])
            if len(failures) > MAX_LEAK_FAILURES:
                raise RuntimeError(failures[0]) from exc
        if i in (first, count):
            snapshots[i] = snapshot(me, i)
        if i % 100 == 0:
            print(f"leak: {i}/{count} runs", file=sys.stderr, flush=True)
    close_launcher(launcher)
    deadline = time.monotonic() + 10
    while descendants(me) and time.monotonic() < deadline:
        time.sleep(0.1)
    before = {d["pid"] for d in snapshots[first]["descendants"]}
    new = [d for d in snapshots[count]["descendants"] if d["pid"] not in before]
    left = [describe(p) for p in descendants(me)]
    metrics = [
        metric(f"{opts.scenario}.new_procs", "procs", LOWER, [len(new)]),
        metric(f"{opts.scenario}.procs_after_close", "procs", LOWER, [len(left)]),
        *growth_metrics(opts.scenario, snapshots[first], snapshots[count]),
        metric(f"{opts.scenario}.failed_runs", "runs", LOWER, [len(failures)]),
    ]
    run_s = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    return measured(
        metrics,
        runs=count,
        first=snapshots[first],
        last=snapshots[count],
        new_descendants=new,
        failed_runs=failures,
        left_after_close=left,
        run_s=run_s,
    )


def growth_metrics(scenario: str, first: dict[str, Any], last: dict[str, Any]) -> list[Record]:
    """Growth of the launcher's fds and RSS and of the agents' RSS between two snapshots."""
    runs = [f"runs {first['run']}->{last['run']}"]
    return [
        metric(f"{scenario}.{name}", unit, LOWER, [last[key] - first[key]], notes=runs)
        for key, name, unit in (
            ("launcher_fds", "launcher_fds_growth", "fds"),
            ("launcher_rss_mib", "launcher_rss_growth", "MiB"),
            ("agent_rss_mib", "agent_rss_growth", "MiB"),
        )
    ]


def probe(opts: argparse.Namespace) -> Result:
    """Versions and locations of the interpreter and packages."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if opts.mode == "launcher":
        trx = load_torchrunx()
        info["torchrunx"] = getattr(trx, "__version__", "unknown")
        info["torchrunx_location"] = str(Path(trx.__file__).parent)
    return measured([], **info)


def multihost_first_run(opts: argparse.Namespace) -> Result:
    """Time the first ``run(noop)`` of a fresh process on ``opts.hosts``, 1 worker each."""
    trx = load_torchrunx()
    imported = time.time()
    start = time.perf_counter()
    launcher = new_launcher(trx, opts)
    try:
        launcher.run(workloads.noop)
        elapsed = time.perf_counter() - start
        seen = check_hosts(launcher, opts)
    finally:
        start = time.perf_counter()
        close_launcher(launcher)
        closed = time.perf_counter() - start
    startup = imported - opts.t0
    return measured(
        [metric(opts.scenario, "s", LOWER, [elapsed])],
        startup_s=startup,
        close_s=closed,
        hosts=seen,
    )


def multihost_later_run(opts: argparse.Namespace) -> Result:
    """Time noop runs of one launcher on ``opts.hosts`` after a warm-up run."""
    with open_launcher(load_torchrunx(), opts) as launcher:
        warmup, _, _ = timed_run(launcher, workloads.noop)
        values = [timed_run(launcher, workloads.noop)[0] for _ in range(opts.reps)]
        seen = check_hosts(launcher, opts)
    return measured([metric(opts.scenario, "s", LOWER, values)], warmup_s=warmup, hosts=seen)


def multihost_worker_kill(opts: argparse.Namespace) -> Result:
    """Rank 1, alone on the 2nd host, is SIGKILLed; time until ``run()`` raises."""
    return failure_latency(opts, workloads.sigkill_rank1, "sigkill")


def multihost_exception_autopsy(opts: argparse.Namespace) -> Result:
    """3 hosts x 1 worker, a warm launcher: rank 1 raises while ranks 0 and 2 wait in a barrier.

    Time until ``run()`` raises: with the autopsy, which asks the two waiting ranks on the other
    hosts for their stacks first. Notes: the type raised and the ranks whose stacks it carries.
    """
    stamp = opts.workdir / EVENT_STAMP
    values: list[float] = []
    notes: list[str] = []
    with open_launcher(load_torchrunx(), opts) as launcher:
        timed_run(launcher, workloads.noop)
        for _ in range(opts.reps):
            stamp.unlink(missing_ok=True)
            try:
                launcher.run(workloads.raise_in_barrier, str(opts.workdir))
            except Exception as exc:  # noqa: BLE001 - the type raised is what is measured
                reported = time.time()
                stacks = sorted(getattr(exc, "stacks", {}))
                notes.append(f"{exception_name(exc)}, stacks of ranks {stacks}")
            else:
                msg = "the run returned: rank 1 was to raise"
                raise RuntimeError(msg)
            values.append(reported - workloads.read_stamp(stamp))
    return measured([metric(opts.scenario, "s", LOWER, values, notes=notes)])


# --- logging ------------------------------------------------------------------------------------


def count_lines(path: Path, count: int) -> dict[str, Any]:
    """How many of the lines ``line 0`` to ``line {count-1}`` reached ``path``, and in order.

    ``lost`` is how many of them are missing; ``lines`` counts every line that ends like one of
    them (a duplicate included); ``in_order`` is whether they came in the order printed.
    """
    seen = bytearray(count)
    lines, previous, in_order = 0, -1, True
    data = path.read_bytes() if path.exists() else b""
    for raw in data.splitlines():
        match = LINE_INDEX.search(raw)
        if match is None:
            continue
        index = int(match[1])
        lines += 1
        in_order = in_order and index > previous
        previous = index
        if index < count:
            seen[index] = 1
    found = sum(seen)
    return {"lines": lines, "lost": count - found, "in_order": in_order, "exists": path.exists()}


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Point this process's stdout (fd 1, and ``sys.stdout``) at ``path`` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with path.open("wb") as target:
            os.dup2(target.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_folder(log_dir: Path) -> Path | None:
    """The one folder that a run made under ``log_dir`` (None if it made none)."""
    folders = [p for p in log_dir.iterdir() if p.is_dir()] if log_dir.exists() else []
    if len(folders) > 1:
        msg = f"expected one run folder in {log_dir}, found {len(folders)}"
        raise RuntimeError(msg)
    return folders[0] if folders else None


def set_log_dir(log_dir: Path | str) -> None:
    """``$TORCHRUNX_LOG_DIR`` of the next runs: both implementations read it at each run."""
    os.environ["TORCHRUNX_LOG_DIR"] = str(log_dir)


def print_seconds(stamp_dir: Path) -> float:
    """How long the worker itself took to print its lines (from its stamps)."""
    start = workloads.read_stamp(stamp_dir / workloads.PRINT_START_STAMP)
    return workloads.read_stamp(stamp_dir / workloads.PRINT_END_STAMP) - start


def lines_per_s(wall: float, noop: float, printing: float) -> float:
    """Lines per second: ``LOG_LINES`` over the run's wall time less a noop run's.

    The difference is never taken below the worker's own printing time (it can be, where the
    noop run happens to be slower: torchrun's whole run of seconds against half of one printing).
    """
    return LOG_LINES / max(wall - noop, printing)


def log_lines_torchrun(opts: argparse.Namespace) -> Result:
    """``torchrun`` of one worker printing ``LOG_LINES`` lines to a file (its stdout)."""
    values: list[float] = []
    extra: dict[str, list[Any]] = {"wall_s": [], "noop_s": [], "print_s": [], "stdout": []}
    for rep in range(opts.reps):
        noop = torchrun_noop(opts.workdir, nproc=1)
        live = opts.workdir / f"stdout.{rep}.txt"
        start = time.perf_counter()
        proc = start_torchrun("print_lines", opts.workdir, str(LOG_LINES), nproc=1, stdout=live)
        code = wait_exit(proc, TORCHRUN_TIMEOUT_S)
        wall = time.perf_counter() - start
        if code != 0:
            msg = f"torchrun exited with {code}: {log_tail(opts.workdir)}"
            raise RuntimeError(msg)
        printing = print_seconds(opts.workdir)
        values.append(lines_per_s(wall, noop, printing))
        extra["wall_s"].append(wall)
        extra["noop_s"].append(noop)
        extra["print_s"].append(printing)
        extra["stdout"].append(count_lines(live, LOG_LINES))
    return log_lines_result(opts.scenario, values, {"lines": LOG_LINES, **extra}, ["stdout"])


def log_lines(opts: argparse.Namespace) -> Result:
    """One worker prints ``LOG_LINES`` lines: lines/s, and how many reached the files and live.

    Default log handling, files under a fresh ``$TORCHRUNX_LOG_DIR`` for each run; the live view
    (this process's stdout) goes to a file. Each measured run follows a noop run of the same
    launcher, whose time it is reduced by.
    """
    if opts.mode == "torchrun":
        return log_lines_torchrun(opts)
    values: list[float] = []
    extra: dict[str, Any] = {"lines": LOG_LINES, "wall_s": [], "noop_s": [], "print_s": []}
    extra.update({"file": [], "agent_file": [], "live": []})
    with open_launcher(load_torchrunx(), workers=1) as launcher:
        # ours shows rank 0 live and copies its lines into the agent's file; torchrunx 0.4.0
        # hands rank 0's records to launcher loggers without handlers (so shows nothing) and
        # keeps the agent's own records in the agent's file
        ours = hasattr(launcher, "live_ranks")
        extra["live_view"] = extra["agent_file_has_worker0"] = ours
        set_log_dir(opts.workdir / "logs.warmup")
        timed_run(launcher, workloads.noop)
        for rep in range(opts.reps):
            set_log_dir(opts.workdir / f"logs.noop.{rep}")
            noop, _, _ = timed_run(launcher, workloads.noop)
            log_dir, live = opts.workdir / f"logs.{rep}", opts.workdir / f"live.{rep}.txt"
            set_log_dir(log_dir)
            with stdout_to(live):
                wall, _, _ = timed_run(
                    launcher, workloads.print_lines, str(opts.workdir), LOG_LINES
                )
            # counted as run() returned: a line written later is a lost line
            folder = run_folder(log_dir) or log_dir
            extra["file"].append(count_lines(folder / f"{LOG_HOST}[0].log", LOG_LINES))
            if ours:
                extra["agent_file"].append(count_lines(folder / f"{LOG_HOST}.log", LOG_LINES))
            extra["live"].append(count_lines(live, LOG_LINES))
            printing = print_seconds(opts.workdir)
            values.append(lines_per_s(wall, noop, printing))
            extra["wall_s"].append(wall)
            extra["noop_s"].append(noop)
            extra["print_s"].append(printing)
    return log_lines_result(opts.scenario, values, extra, ["file", "agent_file", "live"])


def log_lines_result(
    scenario: str, values: list[float], extra: dict[str, Any], destinations: list[str]
) -> Result:
    """lines/s, then the lines lost on the way to each destination, one value per run.

    Notes: ``no live view`` where the implementation shows no lines live; ``out of order`` where
    lines came in another order than printed.
    """
    metrics = [metric(scenario, "lines/s", HIGHER, values)]
    for dest in destinations:
        counts = extra[dest]
        if not counts:
            continue  # a destination this implementation does not have
        notes = []
        if dest == "live" and not extra.get("live_view", True):
            notes.append("no live view")
        if not all(c["in_order"] for c in counts):
            notes.append("out of order")
        lost = [c["lost"] for c in counts]
        metrics.append(metric(f"{scenario}.lost_{dest}", "lines", LOWER, lost, notes=notes))
    return measured(metrics, **extra)


def set_logging(launcher: Any, log_dir: Path, on: bool) -> None:
    """Default logging (files under ``log_dir``, live view), or none at all.

    Off: ``$TORCHRUNX_LOG_DIR=""``, ``log_dir=""`` (where the launcher has that field) and no
    handlers (``set_logging_handlers(None)``).
    """
    set_log_dir(log_dir if on else "")
    if hasattr(launcher, "log_dir"):
        launcher.log_dir = None if on else ""
    launcher.set_logging_handlers("auto" if on else None)


def log_overhead(opts: argparse.Namespace) -> Result:
    """Noop runs of one launcher with default logging and with none, alternating.

    Metrics: the runs with logging on, those with it off (``.off``), and the ratio of their
    medians (``.on_over_off``).
    """
    if opts.mode == "torchrun":
        msg = "torchrun has no log handling to switch off"
        raise RuntimeError(msg)
    on_s: list[float] = []
    off_s: list[float] = []
    log_dir = opts.workdir / "logs"
    with open_launcher(load_torchrunx(), workers=1) as launcher:
        for on in (True, False):  # a warm-up run of each
            set_logging(launcher, log_dir, on)
            timed_run(launcher, workloads.noop)
        for rep in range(opts.reps):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for on in order:
                set_logging(launcher, log_dir, on)
                (on_s if on else off_s).append(timed_run(launcher, workloads.noop)[0])
    on_over_off = statistics.median(on_s) / statistics.median(off_s)
    metrics = [
        metric(opts.scenario, "s", LOWER, on_s),
        metric(f"{opts.scenario}.off", "s", LOWER, off_s),
        metric(f"{opts.scenario}.on_over_off", "x", LOWER, [on_over_off]),
    ]
    return measured(metrics)


# --- runs in flight -----------------------------------------------------------------------------


def check_echo(result: Any, value: int) -> None:
    """Raise unless every worker of a run of ``echo(value)`` returned ``value``."""
    for r in range(WORKERS):
        got = result.rank(r)
        if got != value:
            msg = f"run {value}: rank {r} returned {got!r}"
            raise RuntimeError(msg)


def sweep_sequential(launcher: Any, runs: int) -> tuple[float, list[float]]:
    """``runs`` runs of ``echo``, one after another with ``run()``: (runs/s, each run's s)."""
    latencies = []
    start = time.perf_counter()
    for i in range(runs):
        began = time.perf_counter()
        check_echo(launcher.run(workloads.echo, i), i)
        latencies.append(time.perf_counter() - began)
    return runs / (time.perf_counter() - start), latencies


def sweep_submitted(launcher: Any, runs: int, in_flight: int) -> tuple[float, list[float]]:
    """``runs`` runs of ``echo``, ``in_flight`` of them submitted at any time: (runs/s, each's s).

    A run is submitted the moment another one completes (``wait(FIRST_COMPLETED)``); a run's
    time is from its ``submit()`` to the return of the ``wait()`` that found it done.
    """
    pending: dict[Any, tuple[int, float]] = {}  # handle -> (its argument, when submitted)
    latencies = []
    submitted = 0
    start = time.perf_counter()
    while submitted < runs or pending:
        while submitted < runs and len(pending) < in_flight:
            pending[launcher.submit(workloads.echo, submitted)] = (
                submitted,
                time.perf_counter(),
            )
            submitted += 1
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        now = time.perf_counter()
        for handle in done:
            value, began = pending.pop(handle)
            check_echo(handle.result(), value)
            latencies.append(now - began)
    return runs / (time.perf_counter() - start), latencies


def sweep_in_flight(opts: argparse.Namespace) -> Result:
    """Runs/s of one launcher with 1, 2 or 4 noop runs (``echo``) kept in flight.

    After a warm-up run, each repetition sweeps ``SWEEP_RUNS`` runs at each count in flight
    (in the order 1, 2, 4, then 4, 2, 1 at the next repetition): 1 is a loop of ``run()``, more
    use ``submit()``. Without ``submit()`` (torchrunx 0.4.0), only 1 in flight, with
    ``SWEEP_RUNS_SEQUENTIAL`` runs. Every result is checked. Metrics: see :func:`sweep_metrics`.
    """
    if opts.mode == "torchrun":
        msg = "torchrun runs one program per process: no runs in flight"
        raise RuntimeError(msg)
    runs_per_s: dict[str, list[float]] = {}
    latency: dict[str, list[float]] = {}
    slow: dict[str, list[int]] = {}
    with open_launcher(load_torchrunx()) as launcher:
        submits = hasattr(launcher, "submit")
        runs = SWEEP_RUNS if submits else SWEEP_RUNS_SEQUENTIAL
        counts = IN_FLIGHT if submits else (1,)
        warmup, _, first = timed_run(launcher, workloads.echo, -1)
        check_echo(first, -1)
        for rep in range(opts.reps):
            for k in counts if rep % 2 == 0 else counts[::-1]:
                if k == 1:
                    rate, times = sweep_sequential(launcher, runs)
                else:
                    rate, times = sweep_submitted(launcher, runs, k)
                runs_per_s.setdefault(str(k), []).append(rate)
                latency.setdefault(str(k), []).append(statistics.median(times))
                slow.setdefault(str(k), []).append(sum(t >= SLOW_RUN_S for t in times))
    return measured(
        sweep_metrics(opts.scenario, runs_per_s, slow, runs),
        runs_per_sweep=runs,
        runs_per_s=runs_per_s,
        median_run_s=latency,
        slow_runs=slow,
        slow_run_s=SLOW_RUN_S,
        warmup_s=warmup,
    )


def sweep_metrics(
    scenario: str, runs_per_s: dict[str, list[float]], slow: dict[str, list[int]], runs: int
) -> list[Record]:
    """Metrics of ``sweep_in_flight``: per count K in flight, its sweeps' runs/s and slow runs.

    ``<scenario>_K``: runs/s of each sweep; ``<scenario>_K.slow_runs``: runs of each sweep that
    took ``SLOW_RUN_S`` or more; ``<scenario>.4_over_1``: the median runs/s with the most runs in
    flight over that with one (where more than one count was swept).
    """
    metrics = []
    for k in sorted(runs_per_s, key=int):
        metrics.append(metric(f"{scenario}_{k}", "runs/s", HIGHER, runs_per_s[k]))
        note = [f">= {SLOW_RUN_S:g} s, of {runs} per sweep"]
        metrics.append(metric(f"{scenario}_{k}.slow_runs", "runs", LOWER, slow[k], notes=note))
    if len(runs_per_s) > 1:
        one, most = str(IN_FLIGHT[0]), str(IN_FLIGHT[-1])
        speedup = statistics.median(runs_per_s[most]) / statistics.median(runs_per_s[one])
        metrics.append(metric(f"{scenario}.{most}_over_{one}", "x", HIGHER, [speedup]))
    return metrics


def launcher_only(scenario: Callable[[argparse.Namespace], Result]) -> Callable[..., Result]:
    """A multi-host scenario: launchers only, and only with ``--hosts``."""

    def run(opts: argparse.Namespace) -> Result:
        if opts.mode == "torchrun":
            msg = "torchrun has no multi-host mode here"
            raise RuntimeError(msg)
        if not opts.hosts or not opts.ssh_config:
            msg = "a multi-host scenario needs --hosts and --ssh-config"
            raise RuntimeError(msg)
        return scenario(opts)

    return run


SCENARIOS: dict[str, Callable[[argparse.Namespace], Result]] = {
    "probe": probe,
    "first_run": first_run,
    "later_run": later_run,
    "sigkill_latency": sigkill_latency,
    "exception_in_barrier": exception_in_barrier,
    "results_throughput": results_throughput,
    "results_throughput_encrypted": results_throughput_encrypted,
    "agent_rss": agent_rss,
    "leak_1000": leak_1000,
    "log_lines": log_lines,
    "log_overhead": log_overhead,
    "sweep_in_flight": sweep_in_flight,
    **{
        multihost_first_run_name(k): launcher_only(multihost_first_run)
        for k in MULTIHOST_FIRST_RUN_HOSTS
    },
    "multihost_later_run": launcher_only(multihost_later_run),
    "multihost_worker_kill": launcher_only(multihost_worker_kill),
    "multihost_exception_autopsy": launcher_only(multihost_exception_autopsy),
    "first_failure": first_failure,
    "sweep_big_import": sweep_big_import,
}


def main() -> None:
    """Parse the arguments, run the scenario and write its result file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--mode", choices=["launcher", "torchrun"], required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--t0", type=float, default=time.time(), help="driver's start time")
    parser.add_argument("--hosts", default="", help="comma-separated hosts (multi-host scenarios)")
    parser.add_argument("--ssh-config", type=Path, help="ssh config that reaches --hosts")
    opts = parser.parse_args()
    opts.hosts = [h for h in opts.hosts.split(",") if h]
    opts.workdir.mkdir(parents=True, exist_ok=True)
    try:
        outcome = SCENARIOS[opts.scenario](opts)
    except Exception as exc:  # noqa: BLE001 - reported as the cell's error
        traceback.print_exc()
        outcome = failed(f"{exception_name(exc)}: {exc}"[:500])
    write_result(opts.out, outcome)


if __name__ == "__main__":
    main()
