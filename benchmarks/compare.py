"""Benchmark our torchrunx against torchrunx 0.4.0 and torchrun on this machine.

Usage: ``bash benchmarks/run.sh [--quick] [--only S1,S2] [--impl ours,040,torchrun] [--multihost]``
(which runs ``python3 -m benchmarks.compare`` from the repository root).

Every scenario runs in a fresh process (``scenario.py``) started with the Python of the
implementation under test: ours (``../.venv/bin/python``, ``$PYTHON`` or ``--python``), torchrunx
0.4.0 in its own virtual environment (created here on first use), and torchrun from the torch of
that environment. Each reports flat metrics (``protocol.py``); one table prints them all
(``report.py``), and ``results.json`` keeps them. Standard library only, except for the
multi-host scenarios: they run on fake hosts made by ``testbed.cluster`` (network namespaces with
sshd; needs root and the ``cryptography`` package in this interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import report
from benchmarks.protocol import (
    EVENT_STAMP,
    LOWER,
    MULTIHOST_FIRST_RUN_HOSTS,
    Record,
    multihost_first_run_name,
    read_result,
)

if TYPE_CHECKING:
    from testbed.cluster import Cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF_VENV = HERE / ".venv-torchrunx040"
REF_CONSTRAINTS = HERE / "constraints-torchrunx040.txt"
REF_REQUIREMENTS = ("torch==2.13.0", "torchrunx==0.4.0", "psutil", "transformers==5.24.0")

IMPLS = ("ours", "040", "torchrun")
TITLES = {"ours": "ours", "040": "torchrunx 0.4.0", "torchrun": "torchrun"}
MODES = {"ours": "launcher", "040": "launcher", "torchrun": "torchrun"}
STARTUP_TIMEOUT_S = 240.0  # until a failure scenario has injected its failure
LEFTOVER_GRACE_S = 3.0  # how long processes may outlive the scenario process
TERMINATING = (signal.SIGTERM, signal.SIGHUP)  # unwind (kill, tear down) before exiting
BASE_IMPL = "ours"  # the table's ratio columns divide by its medians
CALLER_DIR_VAR = "BENCH_CALLER_DIR"  # set by run.sh: where relative paths in the options start


def log(message: str) -> None:
    """Progress output (stderr; stdout carries the table only)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    """What to run: one scenario of ``scenario.py``, which reports its own metrics."""

    name: str
    impls: tuple[str, ...]
    process_per_rep: bool = False
    failure: bool = False
    description: str = ""
    hosts: int = 0  # multi-host: nodes of a fresh cluster per scenario process; 0: localhost only


SCENARIOS = (
    Scenario(
        "first_run",
        IMPLS,
        process_per_rep=True,
        description="first Launcher(...).run(noop) of a fresh process; torchrun: whole run",
    ),
    Scenario(
        "later_run",
        IMPLS,
        description="noop run of a launcher after a warm-up run; torchrun: whole run",
    ),
    Scenario(
        "sigkill_latency",
        IMPLS,
        process_per_rep=True,
        failure=True,
        description="rank 1 SIGKILLs itself -> run() raises (torchrun: exits)",
    ),
    Scenario(
        "exception_in_barrier",
        IMPLS,
        process_per_rep=True,
        failure=True,
        description="rank 1 raises, rank 0 in barrier -> run() raises (torchrun: exits)",
    ),
    Scenario(
        "first_failure",
        IMPLS,
        process_per_rep=True,
        failure=True,
        description="fresh launcher: noop run, then rank 1 raises 1 s in, rank 0 in barrier",
    ),
    Scenario(
        "sweep_big_import",
        IMPLS,
        description="runs importing transformers (2-layer GPT-2, one loss): runs after 1 + 5",
    ),
    Scenario(
        "results_throughput",
        ("ours", "040"),
        description="2 x 256 MiB tensors returned: GiB / (return - tensors built)",
    ),
    Scenario(
        "results_throughput_encrypted",
        ("ours",),
        description="as results_throughput, with encrypt=True (CURVE)",
    ),
    Scenario(
        "agent_rss",
        IMPLS,
        description="peak RSS of the agent process during a run (torchrun: its own process)",
    ),
    Scenario(
        "leak_1000",
        ("ours",),
        description="N noop runs on one launcher: leaked processes, fds, RSS",
    ),
    Scenario(
        "log_lines",
        IMPLS,
        description="1 worker prints 200,000 lines: N / (run - noop run); lines lost on the way",
    ),
    Scenario(
        "log_overhead",
        ("ours", "040"),
        description="noop runs of a launcher (1 worker) with default logging and with none",
    ),
    Scenario(
        "sweep_in_flight",
        ("ours", "040"),
        description="sweeps of 100 noop runs of a launcher, 1, 2, 4 in flight (0.4.0: 10, 1)",
    ),
    *(
        Scenario(
            multihost_first_run_name(k),
            ("ours", "040"),
            process_per_rep=True,
            description=f"first run(noop) of a fresh process on {k} host(s) x 1 worker",
            hosts=k,
        )
        for k in MULTIHOST_FIRST_RUN_HOSTS
    ),
    Scenario(
        "multihost_later_run",
        ("ours", "040"),
        description="noop run of a launcher on 4 hosts x 1 worker after a warm-up run",
        hosts=4,
    ),
    Scenario(
        "multihost_worker_kill",
        ("ours", "040"),
        process_per_rep=True,
        failure=True,
        description="2 hosts x 1 worker: rank 1 (2nd host) SIGKILLs itself -> run() raises",
        hosts=2,
    ),
    Scenario(
        "multihost_exception_autopsy",
        ("ours", "040"),
        description="3 hosts x 1 worker, warm: rank 1 raises, ranks 0, 2 in a barrier -> run() "
        "raises (ours: after the autopsy of ranks 0, 2)",
        hosts=3,
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}
MULTIHOST = tuple(s.name for s in SCENARIOS if s.hosts)


@dataclass(frozen=True)
class Ratio:
    """A metric across two scenarios: the median of one metric over that of another."""

    name: str
    numerator: str
    denominator: str
    better: str


_FEWEST, _MOST = MULTIHOST_FIRST_RUN_HOSTS[0], MULTIHOST_FIRST_RUN_HOSTS[-1]
RATIOS = (
    # how the first run scales with the hosts (0.4.0 starts them one after another)
    Ratio(
        f"{multihost_first_run_name(_MOST)}_over_{_FEWEST}",
        multihost_first_run_name(_MOST),
        multihost_first_run_name(_FEWEST),
        LOWER,
    ),
)


@dataclass
class Outcome:
    """What one scenario process produced."""

    status: str  # ok | error | capped
    metrics: list[Record] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_tail: str = ""


@dataclass
class Cell:
    """One implementation's result for one scenario: the metrics of all its processes."""

    status: str  # ok | error | capped | n/a
    metrics: list[Record] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)  # one per process
    message: str = ""
    leftovers: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    """The fields of ``/proc/PID/stat`` that the harness uses."""

    state: str
    ppid: int
    sid: int
    start: int  # clock ticks after boot: tells a process from a later one with the same pid


def process_table() -> dict[int, ProcInfo]:
    """All processes of this machine."""
    table: dict[int, ProcInfo] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        table[int(entry.name)] = ProcInfo(
            fields[0], int(fields[1]), int(fields[3]), int(fields[19])
        )
    return table


def command_of(pid: int) -> str:
    """Command line of a process, shortened."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"[{pid} gone]"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


class ProcessTree:
    """The processes that one scenario process started, directly or not.

    A process is found below the root or in the root's session; once seen it stays tracked (with
    its own descendants) even after it is re-parented or starts a session of its own.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        root_info = process_table().get(root)
        self.known: dict[int, int] = {root: root_info.start} if root_info else {}  # pid -> start

    def refresh(self) -> list[int]:
        """Living tracked processes (the root included while it runs)."""
        table = process_table()
        self.known = {
            pid: start
            for pid, start in self.known.items()
            if pid in table and table[pid].start == start
        }
        found = {pid for pid, info in table.items() if info.sid == self.root}
        frontier = [*self.known, *found]
        children: dict[int, list[int]] = {}
        for pid, info in table.items():
            children.setdefault(info.ppid, []).append(pid)
        while frontier:
            pid = frontier.pop()
            if pid in table and pid not in self.known:
                self.known[pid] = table[pid].start
            frontier.extend(c for c in children.get(pid, []) if c not in self.known)
        self.known.pop(os.getpid(), None)
        return sorted(pid for pid in self.known if table[pid].state != "Z")

    def kill(self) -> None:
        """SIGKILL every tracked process and the root's process group, until none is left."""
        for _ in range(5):
            pids = self.refresh()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if self.root in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.root, signal.SIGKILL)
            if not pids:
                return
            time.sleep(0.1)


def stamp_time(path: Path) -> float | None:
    """Time written to a stamp file, or None if there is none (yet)."""
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 1) -> str:
    """Last non-empty lines of a text file."""
    if not path.exists():
        return ""
    text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(text[-lines:])


@dataclass(frozen=True)
class Implementation:
    """How to start scenario processes for one implementation."""

    key: str
    python: str
    pythonpath: tuple[str, ...]
    setup_error: str = ""

    def env(self) -> dict[str, str]:
        """Environment of its scenario processes."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath)
        return env


@dataclass(frozen=True)
class Limits:
    """Bounds of one scenario process.

    ``timeout`` counts from its start; with a ``cap``, once the failure stamp holds the time of an
    injected failure, the process may run until that time plus ``cap`` instead.
    """

    timeout: float
    cap: float | None = None


def wait_bounded(
    proc: subprocess.Popen[bytes], tree: ProcessTree, stamp: Path, limits: Limits
) -> str:
    """Wait for ``proc``; return "" once it exits, or "timeout"/"capped" once it ran too long."""
    deadline = time.time() + limits.timeout
    polls = 0
    while proc.poll() is None:
        event = stamp_time(stamp) if limits.cap is not None else None
        if limits.cap is not None and event is not None:
            deadline = event + limits.cap
        if time.time() > deadline:
            return "capped" if event is not None else "timeout"
        if polls % 5 == 0:
            tree.refresh()
        polls += 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.1)
    return ""


def leftover_processes(tree: ProcessTree) -> list[str]:
    """Commands of processes that outlive the exited root by more than a grace period."""
    grace = time.monotonic() + LEFTOVER_GRACE_S
    while tree.refresh() and time.monotonic() < grace:
        time.sleep(0.1)
    return [command_of(pid) for pid in tree.refresh()]


# --- hosts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hosts:
    """Fake hosts for one scenario process: ``count`` nodes of a cluster made for it alone.

    With ``hosts_file``, the scenario process runs in a mount namespace of its own in which the
    cluster's hosts file (every node, and this machine's name as the nodes reach it) replaces
    ``/etc/hosts``, as on a cluster whose launcher can resolve its nodes. Without it, the process
    sees this machine's ``/etc/hosts``, which names no node: only the ssh config does.
    """

    count: int
    hosts_file: bool = True


def start_cluster(count: int, state_dir: Path) -> Cluster:
    """A fresh cluster of ``count`` nodes; the caller tears it down with ``down()``."""
    # imported here, not at the top: only the multi-host scenarios need ``cryptography``
    from testbed.cluster import Cluster  # noqa: PLC0415

    return Cluster.up(count, state_dir=state_dir)


def with_hosts_file(cmd: list[str], hosts_file: Path) -> list[str]:
    """``cmd`` in a private mount namespace where ``hosts_file`` is bind-mounted on /etc/hosts."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    unshare = shutil.which("unshare", path=search) or "unshare"
    mount = shutil.which("mount", path=search) or "mount"
    script = f'{mount} --bind "$0" /etc/hosts && exec "$@"'
    # private propagation: the bind mount never reaches this machine's own mount namespace
    wrapper = [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", script]
    return [*wrapper, str(hosts_file), *cmd]


def run_scenario_process(  # noqa: PLR0913 -- keyword-only: how many, how long, where
    impl: Implementation,
    scenario: str,
    workdir: Path,
    *,
    reps: int,
    limits: Limits,
    hosts: Hosts | None = None,
) -> Outcome:
    """Run ``scenario.py`` once in ``workdir``, bounded as in :func:`wait_bounded`.

    With ``hosts``, a cluster is brought up for it (its launcher is given the nodes and their ssh
    config), checked for processes left on the nodes and torn down afterwards, whatever happens.
    """
    workdir.mkdir(parents=True)
    out, stamps = workdir / "result.json", workdir / "stamps"
    cmd = [impl.python, str(HERE / "scenario.py"), scenario, "--mode", MODES[impl.key]]
    cmd += ["--workdir", str(stamps), "--out", str(out), "--reps", str(reps)]
    cluster = None
    if hosts is not None:
        try:
            cluster = start_cluster(hosts.count, workdir / "cluster")
        except Exception as exc:  # noqa: BLE001 - reported as the cell's error
            return Outcome("error", message=f"no cluster of {hosts.count} hosts: {exc}")
    try:
        if cluster is not None:
            cmd += ["--hosts", ",".join(cluster.hostnames), "--ssh-config", str(cluster.ssh_config)]
            if hosts is not None and hosts.hosts_file:
                cmd = with_hosts_file(cmd, cluster.hosts_file)
        return scenario_process(impl, cmd, workdir, limits, cluster)
    finally:
        if cluster is not None:
            cluster.down()


def scenario_process(
    impl: Implementation, cmd: list[str], workdir: Path, limits: Limits, cluster: Cluster | None
) -> Outcome:
    """Start and supervise one scenario process; collect its result and what it left running."""
    out, log_path, stamps = workdir / "result.json", workdir / "output.log", workdir / "stamps"
    cmd = [*cmd, "--t0", repr(time.time())]
    start = time.monotonic()
    try:
        with log_path.open("wb") as output:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=impl.env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as exc:
        return Outcome("error", message=f"cannot start {cmd[0]}: {exc.strerror}")
    tree = ProcessTree(proc.pid)
    killed, leftovers = "", []
    try:
        killed = wait_bounded(proc, tree, stamps / EVENT_STAMP, limits)
        leftovers = [] if killed else leftover_processes(tree)
        if cluster is not None and not killed:
            # started over ssh, the processes on the nodes are no descendants: ask the cluster
            leftovers += cluster.wait_no_processes(timeout=LEFTOVER_GRACE_S)
    finally:
        tree.kill()
        proc.wait()
    outcome = Outcome("error", leftovers=leftovers, seconds=time.monotonic() - start)
    result = read_result(out)
    if "metrics" in result:
        outcome.status, outcome.metrics = "ok", result["metrics"]
        outcome.details = dict(result.get("details", {}))
        if killed:
            outcome.details["note"] = f"scenario process did not exit; killed ({killed})"
        return outcome
    outcome.log_tail = tail(log_path, 20)
    if "error" in result:
        outcome.message = result["error"]
    elif killed == "capped":
        outcome.status, outcome.message = "capped", f"killed {limits.cap:g} s after the failure"
    elif killed:
        outcome.message = f"timed out after {limits.timeout:g} s"
    else:
        outcome.message = tail(log_path) or f"exit code {proc.returncode}"
    return outcome


# --- implementations ----------------------------------------------------------------------------


def ensure_reference_venv() -> Path:
    """Create ``.venv-torchrunx040`` with torch and torchrunx 0.4.0 unless it is complete."""
    python = REF_VENV / "bin" / "python"
    marker = REF_VENV / ".requirements"
    wanted = " ".join(REF_REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    log(f"creating {REF_VENV.name} ({wanted})")
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(REF_VENV)], check=True, timeout=600
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(REF_CONSTRAINTS), *REF_REQUIREMENTS],
        check=True,
        timeout=3600,
        stdout=sys.stderr,
    )
    marker.write_text(wanted)
    return python


def our_python(opts: argparse.Namespace) -> str:
    """Python for our package: ``--python``, ``$PYTHON``, ``../.venv/bin/python`` or this one."""
    if opts.python:
        return str(opts.python)
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def implementations(opts: argparse.Namespace) -> dict[str, Implementation]:
    """The implementations selected by ``--impl``, with their interpreters."""
    impls: dict[str, Implementation] = {}
    if "ours" in opts.impl:
        # The working tree comes first, so the package is measured even if not installed.
        impls["ours"] = Implementation("ours", our_python(opts), (str(HERE), str(REPO)))
    if "040" in opts.impl or "torchrun" in opts.impl:
        try:
            ref_python, error = str(ensure_reference_venv()), ""
        except (OSError, subprocess.SubprocessError) as exc:
            ref_python, error = sys.executable, f"reference venv setup failed: {exc}"
            log(error)
        for key in ("040", "torchrun"):
            if key in opts.impl:
                impls[key] = Implementation(key, ref_python, (str(HERE),), error)
    return impls


# --- running ------------------------------------------------------------------------------------


def repetitions(scenario: str, impl: str, opts: argparse.Namespace) -> int:
    """How many measurements a cell takes (runs, for ``leak_1000``)."""
    quick = opts.quick
    counts = {
        "first_run": opts.first_run_reps or (2 if quick else 5),
        "later_run": (10 if quick else 20) if impl == "ours" else (3 if quick else 5),
        "sigkill_latency": 2 if quick else 3,
        "exception_in_barrier": 2 if quick else 3,
        "first_failure": 3 if quick else 5,
        "sweep_big_import": (5 if quick else 10) if impl == "ours" else (2 if quick else 3),
        "results_throughput": 2 if quick else 3,
        "results_throughput_encrypted": 2 if quick else 3,
        "agent_rss": 1 if quick else 3,
        "leak_1000": opts.leak_count or (100 if quick else 1000),
        "log_lines": 1 if quick else 3,
        "log_overhead": (10 if quick else 20) if impl == "ours" else (3 if quick else 5),
        "sweep_in_flight": (1 if quick else 3) if impl == "ours" else 1,
        "multihost_later_run": (10 if quick else 20) if impl == "ours" else (3 if quick else 5),
        "multihost_worker_kill": 2 if quick else 3,
        "multihost_exception_autopsy": (5 if quick else 10) if impl == "ours" else 3,
    }
    if scenario.startswith("multihost_first_run_"):
        return 1 if quick else 3
    return counts[scenario]


def timeout_for(scenario: str, reps: int) -> float:
    """Bound on one scenario process."""
    per_rep = {
        "first_run": 0.0,
        "later_run": 30.0,
        "results_throughput": 60.0,
        "results_throughput_encrypted": 60.0,
        "agent_rss": 30.0,
        "leak_1000": 2.0,
        "log_lines": 180.0,
        "log_overhead": 60.0,
        "sweep_in_flight": 300.0,  # ours: 3 sweeps of 100 runs; 0.4.0: 1 of 10
        "multihost_later_run": 30.0,
        "multihost_exception_autopsy": 30.0,
        "sweep_big_import": 40.0,
    }
    return STARTUP_TIMEOUT_S + per_rep.get(scenario, 0.0) * reps


def run_cell(
    scenario: Scenario, impl: Implementation, opts: argparse.Namespace, workdir: Path
) -> Cell:
    """Measure one implementation on one scenario."""
    if impl.setup_error:
        return Cell("error", message=impl.setup_error)
    reps = repetitions(scenario.name, impl.key, opts)
    per_process = scenario.process_per_rep
    runs = range(reps) if per_process else range(1)
    if scenario.failure:
        limits = Limits(STARTUP_TIMEOUT_S, opts.cap)
    else:
        limits = Limits(timeout_for(scenario.name, reps))
    hosts = Hosts(scenario.hosts, not opts.system_hosts) if scenario.hosts else None
    cell = Cell("ok")
    for rep in runs:
        outcome = run_scenario_process(
            impl,
            scenario.name,
            workdir / f"{scenario.name}.{impl.key}.{rep}",
            reps=1 if per_process else reps,
            limits=limits,
            hosts=hosts,
        )
        cell.processes.append({"status": outcome.status, "seconds": round(outcome.seconds, 2)})
        cell.leftovers += outcome.leftovers
        if outcome.status != "ok":
            cell.status, cell.message, cell.log_tail = (
                outcome.status,
                outcome.message,
                outcome.log_tail,
            )
            break
        cell.metrics += outcome.metrics
        cell.details.append(outcome.details)
    if cell.status == "ok" and not any(m["values"] for m in cell.metrics):
        cell.status, cell.message = "error", "no measurements"
    return cell


def probe(impl: Implementation, workdir: Path) -> dict[str, Any]:
    """Interpreter and package versions of an implementation."""
    info: dict[str, Any] = {"python_executable": impl.python}
    if impl.setup_error:
        return {**info, "error": impl.setup_error}
    outcome = run_scenario_process(
        impl, "probe", workdir / f"probe.{impl.key}", reps=1, limits=Limits(120.0)
    )
    if outcome.status != "ok":
        return {**info, "error": outcome.message}
    return {**info, **outcome.details}


# --- report -------------------------------------------------------------------------------------


def missing_text(cell: Cell, cap: float) -> str:
    """Why an implementation has no values for the metrics of a scenario: how its cell ended."""
    if cell.status == "error":
        return f"error: {cell.message[:70]}"
    if cell.status == "capped":
        return f"> {cap:g} s (capped)"
    return report.NOT_APPLICABLE


def scenario_metrics(name: str, cells: dict[str, Cell], cap: float) -> list[report.Metric]:
    """The metrics of one scenario, with each implementation's values or why it has none.

    A cell that did not end well shows its error (or cap) in every metric of the scenario, not
    the values of the processes it ran before (those stay in the results file); processes left
    running are a note on the scenario's first metric.
    """
    metrics: dict[str, report.Metric] = {}
    for impl, cell in cells.items():
        if cell.status == "ok":
            report.collect(metrics, impl, cell.metrics, scenario=name)
    if not metrics:  # nothing measured: one row still says why
        metrics[name] = report.Metric(name, "", LOWER, name)
    first = next(iter(metrics.values()))
    for impl, cell in cells.items():
        for metric in metrics.values():
            if not metric.values.get(impl):
                metric.missing[impl] = missing_text(cell, cap)
            if cell.status == "capped":
                metric.at_least[impl] = cap  # a failure scenario's latency: at least the cap
        if cell.leftovers:
            first.notes.setdefault(impl, []).append(f"{len(cell.leftovers)} procs left running")
    return list(metrics.values())


def all_metrics(results: dict[str, dict[str, Cell]], cap: float) -> list[report.Metric]:
    """Every metric, in the order of the scenarios; each of :data:`RATIOS` after its inputs."""
    metrics = [m for name, cells in results.items() for m in scenario_metrics(name, cells, cap)]
    for spec in RATIOS:
        index = {m.name: i for i, m in enumerate(metrics)}
        if spec.numerator in index and spec.denominator in index:
            top, bottom = metrics[index[spec.numerator]], metrics[index[spec.denominator]]
            derived = report.ratio(spec.name, top, bottom, spec.better)
            metrics.insert(max(index[spec.numerator], index[spec.denominator]) + 1, derived)
    return metrics


def cell_summary(name: str, impl: str, cell: Cell, cap: float) -> str:
    """One implementation's metrics of one scenario on one line, for the progress output."""
    metrics = scenario_metrics(name, {impl: cell}, cap)
    return "; ".join(f"{m.name} {report.cell(m, impl)}" for m in metrics)


def machine_info() -> dict[str, Any]:
    """Hardware and OS of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        info["memory_gib"] = round(int(meminfo[0].split()[1]) / 2**20, 1)
    return info


def git_info() -> dict[str, Any]:
    """Commit and dirtiness of the working tree."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO), *args],  # noqa: S607
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--only", default=",".join(BY_NAME), help="comma-separated scenarios (default: all)"
    )
    parser.add_argument(
        "--impl", default=",".join(IMPLS), help="comma-separated: ours,040,torchrun (default: all)"
    )
    parser.add_argument("--python", help="Python for our package (default: $PYTHON or ../.venv)")
    parser.add_argument("--cap", type=float, default=30.0, help="seconds after an injected failure")
    parser.add_argument("--first-run-reps", type=int, default=0, help="fresh processes (5)")
    parser.add_argument("--leak-count", type=int, default=0, help="runs in leak_1000 (1000)")
    parser.add_argument("--output", type=Path, default=HERE / "results.json", help="JSON report")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs of every process")
    parser.add_argument(
        "--multihost", action="store_true", help="only the multi-host scenarios (of --only)"
    )
    parser.add_argument(
        "--single-host", action="store_true", help="leave out the multi-host scenarios"
    )
    parser.add_argument(
        "--system-hosts",
        action="store_true",
        help="multi-host launchers see this machine's /etc/hosts, not the cluster's",
    )
    opts = parser.parse_args(argv)
    # run.sh starts this module from the repository root; a relative path means the caller's
    opts.output = Path(os.environ.get(CALLER_DIR_VAR) or Path.cwd()) / opts.output
    opts.only = [s for s in opts.only.split(",") if s]
    if opts.multihost:
        opts.only = [s for s in opts.only if s in MULTIHOST]
    if opts.single_host:
        opts.only = [s for s in opts.only if s not in MULTIHOST]
    opts.impl = [i for i in opts.impl.split(",") if i]
    unknown = [s for s in opts.only if s not in BY_NAME] + [i for i in opts.impl if i not in IMPLS]
    if unknown:
        parser.error(f"unknown scenario or implementation: {', '.join(unknown)}")
    return opts


def terminate(signum: int, _frame: object) -> None:
    """On SIGTERM or SIGHUP, unwind: the scenario process is killed, the cluster torn down."""
    for sig in TERMINATING:  # a second signal must not interrupt the clean-up of the first
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the table, write the JSON report."""
    opts = parse_args(argv)
    for sig in TERMINATING:
        signal.signal(sig, terminate)
    impls = implementations(opts)
    keys = [k for k in IMPLS if k in impls]
    workdir = Path(tempfile.mkdtemp(prefix="torchrunx-bench-"))
    results: dict[str, dict[str, Cell]] = {}
    try:
        versions = {k: probe(impls[k], workdir) for k in keys}
        for name in [s.name for s in SCENARIOS if s.name in opts.only]:
            scenario = BY_NAME[name]
            results[name] = {}
            for key in keys:
                if key not in scenario.impls:
                    results[name][key] = Cell("n/a")
                    continue
                log(f"[{name} | {TITLES[key]}] running")
                cell = run_cell(scenario, impls[key], opts, workdir)
                results[name][key] = cell
                log(f"[{name} | {TITLES[key]}] {cell_summary(name, key, cell, opts.cap)}")
    finally:
        if opts.keep_workdir:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    metrics = all_metrics(results, opts.cap)
    rows = report.table(metrics, {k: TITLES[k] for k in keys}, BASE_IMPL)
    machine, git = machine_info(), git_info()
    torch_versions = sorted({str(v.get("torch")) for v in versions.values() if "torch" in v})
    print(
        f"# {machine.get('cpu_model', '?')}, {machine['cpus_usable']} CPUs, "
        f"torch {', '.join(torch_versions) or '?'}, commit {git['commit'] or 'none'}"
    )
    print(report.render(rows))
    document = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "machine": machine,
        "git": git,
        "implementations": versions,
        "metrics": [asdict(m) for m in metrics],
        "scenarios": {
            name: {
                "description": BY_NAME[name].description,
                "hosts": BY_NAME[name].hosts,
                "cells": {k: asdict(c) for k, c in cells.items()},
            }
            for name, cells in results.items()
        },
        "table": rows,
    }
    opts.output.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
