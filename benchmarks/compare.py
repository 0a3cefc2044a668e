"""Benchmark our torchrunx against torchrunx 0.4.0 and torchrun on this machine.

Usage: ``bash benchmarks/run.sh [--quick] [--only S1,S2] [--impl ours,040,torchrun]``.

Every scenario runs in a fresh process (``scenario.py``) started with the Python of the
implementation under test: ours (``../.venv/bin/python``, ``$PYTHON`` or ``--python``), torchrunx
0.4.0 in its own virtual environment (created here on first use), and torchrun from the torch of
that environment. Prints one table and writes ``results.json``. Standard library only.
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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF_VENV = HERE / ".venv-torchrunx040"
REF_CONSTRAINTS = HERE / "constraints-torchrunx040.txt"
REF_REQUIREMENTS = ("torch==2.13.0", "torchrunx==0.4.0", "psutil")
EVENT_STAMP = "event"  # workloads.EVENT_STAMP; this module imports no torch

IMPLS = ("ours", "040", "torchrun")
TITLES = {"ours": "ours", "040": "torchrunx 0.4.0", "torchrun": "torchrun"}
MODES = {"ours": "launcher", "040": "launcher", "torchrun": "torchrun"}
STARTUP_TIMEOUT_S = 240.0  # until a failure scenario has injected its failure
LEFTOVER_GRACE_S = 3.0  # how long processes may outlive the scenario process


def log(message: str) -> None:
    """Progress output (stderr; stdout carries the table only)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    """One row of the table."""

    name: str
    unit: str
    impls: tuple[str, ...]
    process_per_rep: bool = False
    failure: bool = False
    higher_is_better: bool = False
    description: str = ""


SCENARIOS = (
    Scenario(
        "first_run",
        "s",
        IMPLS,
        process_per_rep=True,
        description="first Launcher(...).run(noop) of a fresh process; torchrun: whole run",
    ),
    Scenario(
        "later_run",
        "s",
        IMPLS,
        description="noop run of a launcher after a warm-up run; torchrun: whole run",
    ),
    Scenario(
        "sigkill_latency",
        "s",
        IMPLS,
        process_per_rep=True,
        failure=True,
        description="rank 1 SIGKILLs itself -> run() raises (torchrun: exits)",
    ),
    Scenario(
        "exception_in_barrier",
        "s",
        IMPLS,
        process_per_rep=True,
        failure=True,
        description="rank 1 raises, rank 0 in barrier -> run() raises (torchrun: exits)",
    ),
    Scenario(
        "results_throughput",
        "GiB/s",
        ("ours", "040"),
        higher_is_better=True,
        description="2 x 256 MiB tensors returned: GiB / (return - tensors built)",
    ),
    Scenario(
        "agent_rss",
        "MiB",
        IMPLS,
        description="peak RSS of the agent process during a run (torchrun: its own process)",
    ),
    Scenario(
        "leak_1000",
        "procs",
        ("ours",),
        description="N noop runs on one launcher: leaked processes, fds, RSS",
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Outcome:
    """What one scenario process produced."""

    status: str  # ok | error | capped
    values: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_tail: str = ""


@dataclass
class Cell:
    """One implementation's result for one scenario."""

    status: str  # ok | error | capped | n/a
    values: list[float] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    leftovers: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""

    def median(self) -> float | None:
        """Median of the values, if there are any."""
        return statistics.median(self.values) if self.values else None


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


def run_scenario_process(
    impl: Implementation,
    scenario: str,
    workdir: Path,
    *,
    reps: int,
    limits: Limits,
) -> Outcome:
    """Run ``scenario.py`` once in ``workdir``, bounded as in :func:`wait_bounded`."""
    workdir.mkdir(parents=True)
    out, log_path, stamps = workdir / "result.json", workdir / "output.log", workdir / "stamps"
    cmd = [impl.python, str(HERE / "scenario.py"), scenario, "--mode", MODES[impl.key]]
    cmd += ["--workdir", str(stamps), "--out", str(out), "--reps", str(reps)]
    cmd += ["--t0", repr(time.time())]
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
        return Outcome("error", message=f"cannot start {impl.python}: {exc.strerror}")
    tree = ProcessTree(proc.pid)
    killed, leftovers = "", []
    try:
        killed = wait_bounded(proc, tree, stamps / EVENT_STAMP, limits)
        leftovers = [] if killed else leftover_processes(tree)
    finally:
        tree.kill()
        proc.wait()
    outcome = Outcome("error", leftovers=leftovers, seconds=time.monotonic() - start)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if "values" in result:
        outcome.status, outcome.values = "ok", result["values"]
        outcome.extra = dict(result.get("extra", {}))
        if killed:
            outcome.extra["note"] = f"scenario process did not exit; killed ({killed})"
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
        "results_throughput": 2 if quick else 3,
        "agent_rss": 1 if quick else 3,
        "leak_1000": opts.leak_count or (100 if quick else 1000),
    }
    return counts[scenario]


def timeout_for(scenario: str, reps: int) -> float:
    """Bound on one scenario process."""
    per_rep = {
        "first_run": 0.0,
        "later_run": 30.0,
        "results_throughput": 60.0,
        "agent_rss": 30.0,
        "leak_1000": 2.0,
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
    cell = Cell("ok")
    for rep in runs:
        outcome = run_scenario_process(
            impl,
            scenario.name,
            workdir / f"{scenario.name}.{impl.key}.{rep}",
            reps=1 if per_process else reps,
            limits=limits,
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
        cell.values += outcome.values
        cell.extras.append(outcome.extra)
    if cell.status == "ok" and not cell.values and scenario.name != "leak_1000":
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
    return {**info, **outcome.extra}


# --- report -------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    """A value with its unit; seconds below one are shown in milliseconds."""
    if unit == "s" and value < 1:
        return f"{value * 1e3:.3g} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.3g} {unit}"


def fmt_range(cell: Cell, unit: str) -> str:
    """Median (min-max) of a cell's values."""
    median = cell.median()
    if median is None:
        return "-"
    if len(cell.values) == 1:
        return fmt(median, unit)
    low, high = fmt(min(cell.values), unit), fmt(max(cell.values), unit)
    low_number, low_unit = low.split(" ")
    if high.endswith(f" {low_unit}"):
        low = low_number
    return f"{fmt(median, unit)} ({low}-{high})"


def fmt_leak(cell: Cell) -> str:
    """Summary of the leak scenario."""
    extra = cell.extras[0]
    first, last = extra["first"], extra["last"]
    return (
        f"{len(extra['new_descendants'])} new procs, "
        f"{len(extra['left_after_close'])} after close; "
        f"fds {first['launcher_fds']}->{last['launcher_fds']}; "
        f"RSS {first['launcher_rss_mib']:.0f}->{last['launcher_rss_mib']:.0f} MiB; "
        f"agent {first['agent_rss_mib']:.0f}->{last['agent_rss_mib']:.0f} MiB "
        f"(runs {first['run']}->{last['run']})"
        + (f"; {len(extra['failed_runs'])} runs failed" if extra.get("failed_runs") else "")
    )


def raised_types(cell: Cell) -> str:
    """Distinct exception types (or exit codes) recorded by a failure scenario."""
    names: list[str] = []
    for extra in cell.extras:
        names += [n for n in extra.get("raised", []) if n not in names]
    return "/".join(names)


def fmt_cell(cell: Cell, scenario: Scenario, opts: argparse.Namespace) -> str:
    """Text of one table cell."""
    if cell.status == "n/a":
        return "n/a"
    if cell.status == "error":
        return f"error: {cell.message[:70]}"
    if cell.status == "capped":
        return f"> {opts.cap:g} s (capped) [none (capped)]"
    if scenario.name == "leak_1000":
        text = fmt_leak(cell)
    elif scenario.name == "agent_rss":
        steady = statistics.median(s for e in cell.extras for s in e.get("steady_mib", []))
        text = f"{fmt_range(cell, 'MiB')}, steady {steady:.0f}"
    else:
        text = fmt_range(cell, scenario.unit)
    if scenario.failure:
        text += f" [{raised_types(cell)}]"
    if cell.leftovers:
        text += f" [{len(cell.leftovers)} procs left running]"
    return text


def fmt_ratio_value(ratio: float) -> str:
    """A ratio with two decimals, or none from 100 on."""
    return f"{ratio:.0f}" if ratio >= 100 else f"{ratio:.2f}"


def fmt_ratio(cells: dict[str, Cell], opts: argparse.Namespace) -> str:
    """0.4.0 / ours, on the medians."""
    ours, ref = cells.get("ours"), cells.get("040")
    if ours is None or ref is None:
        return ""
    ours_median, ref_median = ours.median(), ref.median()
    if ours.status != "ok" or not ours_median:
        return ""
    if ref.status == "capped":
        return f"> {fmt_ratio_value(opts.cap / ours_median)}"
    if ref.status != "ok" or ref_median is None:
        return ""
    return fmt_ratio_value(ref_median / ours_median)


def startup_cell(cell: Cell) -> Cell:
    """Python start plus imports, derived from the ``first_run`` processes."""
    values = [e["startup_s"] for e in cell.extras if "startup_s" in e]
    if cell.status != "ok" or not values:
        return Cell(cell.status if cell.status != "ok" else "n/a", message=cell.message)
    return Cell("ok", values)


def table_rows(
    results: dict[str, dict[str, Cell]], impls: list[str], opts: argparse.Namespace
) -> list[list[str]]:
    """Header and rows of the report table."""
    header = ["scenario", *(TITLES[k] for k in impls)]
    if "ours" in impls and "040" in impls:
        header.append("0.4.0/ours")
    rows = [header]
    for name, cells in results.items():
        if all(cells[k].status == "n/a" for k in impls):
            continue
        scenario = BY_NAME[name]
        better = "higher" if scenario.higher_is_better else "lower"
        unit = "" if scenario.unit == "procs" else f" [{scenario.unit}, {better} is better]"
        row = [name + unit, *(fmt_cell(cells[k], scenario, opts) for k in impls)]
        if len(header) > len(row):
            row.append(fmt_ratio(cells, opts))
        rows.append(row)
        if name == "first_run":
            derived = {k: startup_cell(cells[k]) for k in impls}
            row = ["  startup (python + imports) [s]"]
            row += [fmt_cell(derived[k], scenario, opts) for k in impls]
            if len(header) > len(row):
                row.append(fmt_ratio(derived, opts))
            rows.append(row)
    return rows


def render(rows: list[list[str]]) -> str:
    """Rows as an aligned text table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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
    opts = parser.parse_args(argv)
    opts.only = [s for s in opts.only.split(",") if s]
    opts.impl = [i for i in opts.impl.split(",") if i]
    unknown = [s for s in opts.only if s not in BY_NAME] + [i for i in opts.impl if i not in IMPLS]
    if unknown:
        parser.error(f"unknown scenario or implementation: {', '.join(unknown)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the table, write the JSON report."""
    opts = parse_args(argv)
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
                log(f"[{name} | {TITLES[key]}] {fmt_cell(cell, scenario, opts)}")
    finally:
        if opts.keep_workdir:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = table_rows(results, keys, opts)
    machine, git = machine_info(), git_info()
    torch_versions = sorted({str(v.get("torch")) for v in versions.values() if "torch" in v})
    print(
        f"# {machine.get('cpu_model', '?')}, {machine['cpus_usable']} CPUs, "
        f"torch {', '.join(torch_versions) or '?'}, commit {git['commit'] or 'none'}"
    )
    print(render(rows))
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "machine": machine,
        "git": git,
        "implementations": versions,
        "scenarios": {
            name: {
                "unit": BY_NAME[name].unit,
                "higher_is_better": BY_NAME[name].higher_is_better,
                "description": BY_NAME[name].description,
                "cells": {k: asdict(c) for k, c in cells.items()},
            }
            for name, cells in results.items()
        },
        "table": rows,
    }
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
