"""One measurement of ``many_hosts.py``, run with the Python of the implementation under test.

``python many_hosts_run.py --hosts node1,... --ssh-config FILE --reps N --out FILE --launcher-cpu
FILE --node-cpu FILE,...``: times the launcher's start (where it has ``start()``), its first
run and ``N`` later ones (of ``workloads.hostname``: a noop whose result shows where each rank
ran), 1 gloo worker per host, and reads the CPU time of the
launcher (its cgroup: the process and anything it forks locally) and of each test host (one
cgroup per host: sshd, agent, workers) at each boundary. Imports only the standard library,
``torchrunx`` (whichever this interpreter finds: ours or 0.4.0) and ``workloads``, so it runs in
either virtual environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# the worker functions, found on PYTHONPATH (this folder) like the workers find them
workloads = importlib.import_module("workloads")
CGROUP_WAIT_S = 10.0  # the driver moves this process into the launcher's cgroup right after start


def cpu_seconds(path: Path) -> float:
    """CPU time of a cgroup: ``cpuacct.usage`` (v1, ns) or ``usage_usec`` of ``cpu.stat`` (v2)."""
    text = path.read_text()
    if path.name == "cpu.stat":
        usec = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))
        return int(usec) / 1e6
    return int(text) / 1e9


@dataclass
class Clock:
    """Reads wall time and the CPU counters at the boundaries of the measured phases."""

    launcher: Path
    nodes: list[Path]

    def read(self) -> dict[str, Any]:
        """Wall time, this process's CPU, the launcher cgroup's CPU, each host's CPU."""
        return {
            "wall": time.perf_counter(),
            "process": time.process_time(),
            "launcher": cpu_seconds(self.launcher),
            "nodes": [cpu_seconds(p) for p in self.nodes],
        }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a phase cost: wall, launcher (process and cgroup) and test bed (sum and max host)."""
    hosts = [b - a for a, b in zip(before["nodes"], after["nodes"], strict=True)]
    return {
        "wall_s": after["wall"] - before["wall"],
        "launcher_process_cpu_s": after["process"] - before["process"],
        "launcher_cpu_s": after["launcher"] - before["launcher"],
        "testbed_cpu_s": sum(hosts),
        "testbed_max_host_cpu_s": max(hosts),
    }


@dataclass
class Measured:
    """The phases of one launcher's life; ``start`` is None where it has no ``start()``."""

    start: dict[str, Any] | None = None
    first_run: dict[str, Any] | None = None
    later_runs: list[dict[str, Any]] = field(default_factory=list)
    later_total: dict[str, Any] | None = None


def wait_in_cgroup(procs: Path) -> None:
    """Wait until the driver has moved this process into the launcher's cgroup."""
    deadline = time.monotonic() + CGROUP_WAIT_S
    while str(os.getpid()) not in procs.read_text().split():
        if time.monotonic() > deadline:
            msg = f"this process was not moved into {procs.parent}"
            raise RuntimeError(msg)
        time.sleep(0.01)


def measure(opts: argparse.Namespace, clock: Clock) -> Measured:
    """Start a launcher, time its phases; every run is checked to have used every host."""
    trx = importlib.import_module("torchrunx")
    out = Measured()
    t0 = clock.read()
    launcher = trx.Launcher(
        hostnames=opts.hosts, workers_per_host=1, backend="gloo", ssh_config_file=opts.ssh_config
    )
    try:
        if hasattr(launcher, "start"):  # 0.4.0 starts its agents in every run()
            launcher.start()
            t1 = clock.read()
            out.start, t0 = delta(t0, t1), t1
        checked_run(launcher, opts.hosts)
        first = clock.read()
        out.first_run = delta(t0, first)
        for _ in range(opts.reps):
            before = clock.read()
            checked_run(launcher, opts.hosts)
            out.later_runs.append(delta(before, clock.read()))
        out.later_total = delta(first, clock.read())
    finally:
        if hasattr(launcher, "close"):
            launcher.close()
    return out


def checked_run(launcher: Any, hosts: list[str]) -> None:
    """A run of a noop that returns its host's name: rank ``i`` must have run on host ``i``."""
    result = launcher.run(workloads.hostname)
    seen = [result.rank(r) for r in range(len(hosts))]
    if seen != hosts:
        msg = f"ranks ran on {seen}, not on {hosts}"
        raise RuntimeError(msg)


def summary(out: Measured, reps: int) -> dict[str, Any]:
    """Medians of the later runs' wall time; CPU per later run from the total over all of them.

    The total is used for CPU because a run's teardown on the hosts can end after ``run()``
    returned, so a single run's CPU may land in the next one.
    """
    total = out.later_total or {}
    return {
        "start_s": out.start["wall_s"] if out.start else None,
        "first_run_s": out.first_run["wall_s"] if out.first_run else None,
        "later_run_s": statistics.median(r["wall_s"] for r in out.later_runs),
        "launcher_cpu_per_later_run_s": total["launcher_cpu_s"] / reps,
        "launcher_process_cpu_per_later_run_s": total["launcher_process_cpu_s"] / reps,
        "testbed_cpu_per_later_run_s": total["testbed_cpu_s"] / reps,
        "testbed_max_host_cpu_per_later_run_s": total["testbed_max_host_cpu_s"] / reps,
    }


def main() -> None:
    """Parse the arguments, measure, write the result (or the error) as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", required=True, help="comma-separated host names")
    parser.add_argument("--ssh-config", required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launcher-cpu", type=Path, required=True)
    parser.add_argument("--node-cpu", required=True, help="comma-separated cgroup CPU files")
    opts = parser.parse_args()
    opts.hosts = opts.hosts.split(",")
    clock = Clock(opts.launcher_cpu, [Path(p) for p in opts.node_cpu.split(",")])
    try:
        wait_in_cgroup(opts.launcher_cpu.parent / "cgroup.procs")
        out = measure(opts, clock)
        result: dict[str, Any] = {"summary": summary(out, opts.reps), "phases": asdict(out)}
    except Exception as exc:  # noqa: BLE001 -- reported in the results, with its traceback
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    opts.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
