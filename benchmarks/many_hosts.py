"""The launcher on many test hosts: ``python -m benchmarks.many_hosts [--hosts 1,4,8,16,32]``.

Run from the repository root, as root. For each host count, on a fresh cluster of
``testbed/cluster.py`` (network namespaces with an sshd each, 1 gloo worker per host), a fresh
process (``many_hosts_run.py``) times the launcher's ``start()``, its first run of a noop and
``--reps`` later runs, ``--rounds`` times. CPU time is read from cgroups that this script makes:
one for the launcher process (and what it forks locally), one per host (its sshd and everything
started through it: agent, forkserver, workers), so the launcher's own cost and the test bed's
are told apart, processes that already exited included. The kernel's neighbour (ARP) table,
one for all network namespaces, is enlarged for the measurement when the hosts' full mesh would
overflow it (``--keep-arp-limits``: not). torchrunx 0.4.0 runs the same way at
``--ref-hosts`` from its own virtual environment (made by ``compare.py`` on first use).

Writes ``--output`` (JSON), prints a table and the cost per host (least-squares slope over the
host counts), and draws ``--png`` if matplotlib is installed; ``--draw`` only redraws the PNG from
``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.compare import ensure_reference_venv, git_info, machine_info, with_hosts_file
from testbed.cluster import Cluster
from testbed.process import all_pids, ns_id

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TITLES = {"ours": "ours", "040": "torchrunx 0.4.0"}
CGROUP_ROOTS = (
    Path("/sys/fs/cgroup/cpuacct"),
    Path("/sys/fs/cgroup/unified"),
    Path("/sys/fs/cgroup"),
)
FIELDS = (  # the summary's figures, in the table's order: key, column title
    ("start_s", "start()"),
    ("first_run_s", "first run"),
    ("later_run_s", "later run"),
    ("launcher_cpu_per_later_run_s", "launcher CPU / later run"),
    ("testbed_cpu_per_later_run_s", "test bed CPU / later run"),
    ("testbed_max_host_cpu_per_later_run_s", "busiest host CPU / later run"),
)
# The kernel keeps one neighbour (ARP) table for all network namespaces, capped by gc_thresh3
# (1024 by default): N fake hosts in a full mesh (gloo) need about N * (N + 1) entries, so 32
# overflow it and connections between hosts fail with "No route to host" until an entry frees up.
ARP_LIMITS = Path("/proc/sys/net/ipv4/neigh/default")
ARP_OVERFLOW = "neighbor table overflow"
SLOPES = ("start_s", "later_run_s", "launcher_cpu_per_later_run_s", "testbed_cpu_per_later_run_s")
LEFTOVER_GRACE_S = 3.0
OPTIONS = ("hosts", "reps", "rounds", "ref_hosts", "ref_reps", "timeout", "keep_arp_limits")


# --- CPU accounting -----------------------------------------------------------------------------


def cgroup_root() -> tuple[Path, str]:
    """A cgroup hierarchy that accounts CPU, and its usage file: v1 cpuacct, else v2."""
    for root in CGROUP_ROOTS:
        if (root / "cpuacct.usage").exists():
            return root, "cpuacct.usage"
        if (root / "cgroup.controllers").exists():
            return root, "cpu.stat"
    msg = "no cgroup hierarchy that accounts CPU (cpuacct or cgroup2) is mounted"
    raise RuntimeError(msg)


class CpuGroups:
    """One cgroup for the launcher and one per host, below a cgroup of this measurement."""

    def __init__(self, hosts: int) -> None:
        root, self.usage = cgroup_root()
        self.base = Path(tempfile.mkdtemp(prefix=f"trxbench-{os.getpid()}-", dir=root))
        self.launcher = self.base / "launcher"
        self.nodes = [self.base / f"node{i + 1}" for i in range(hosts)]
        for group in (self.launcher, *self.nodes):
            group.mkdir()

    def add(self, group: Path, pid: int) -> None:
        """Move ``pid`` into ``group``; what it starts from then on is counted there too."""
        (group / "cgroup.procs").write_text(str(pid))

    def files(self) -> tuple[Path, list[Path]]:
        """The usage files of the launcher and of each host."""
        return self.launcher / self.usage, [n / self.usage for n in self.nodes]

    def left(self) -> list[int]:
        """Processes still in any of the groups."""
        groups = (self.launcher, *self.nodes)
        return [int(p) for g in groups for p in (g / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Remove the groups (empty by now: the cluster and the launcher are gone)."""
        for group in (self.launcher, *self.nodes, self.base):
            with contextlib.suppress(OSError):
                group.rmdir()


def netns_pids(namespace: str) -> list[int]:
    """Processes in a network namespace (right after ``Cluster.up``: the node's sshd listener)."""
    st = (Path("/run/netns") / namespace).stat()
    return [pid for pid in all_pids() if ns_id(pid, "net") == (st.st_dev, st.st_ino)]


# --- the test bed's neighbour table -------------------------------------------------------------


@contextlib.contextmanager
def arp_table_for(hosts: int, keep: bool) -> Iterator[dict[str, int]]:
    """Raise the neighbour table's limits to fit ``hosts`` in a full mesh (unless ``keep``).

    Other clusters on this machine use the same table, hence the margin; the old limits are
    written back afterwards.
    """
    files = {name: ARP_LIMITS / name for name in ("gc_thresh2", "gc_thresh3")}
    old = {name: int(path.read_text()) for name, path in files.items()}
    need = 4 * hosts * (hosts + 1)
    new = old if keep else {name: max(value, need) for name, value in old.items()}
    try:
        for name, path in files.items():
            path.write_text(str(new[name]))
        yield new
    finally:
        for name, path in files.items():
            path.write_text(str(old[name]))


def arp_overflows(since: float) -> int:
    """How many "neighbor table overflow" lines the kernel logged since ``since``.

    ``since`` is a ``time.monotonic()`` value, the clock of the kernel log's timestamps; counting
    by time, not by lines, because the ring buffer drops old lines (every veth logs a few).
    """
    dmesg = shutil.which("dmesg", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin"]))
    if dmesg is None:
        return 0
    done = subprocess.run([dmesg], capture_output=True, text=True, timeout=30, check=False)
    stamped = (re.match(r"\[\s*(\d+\.\d+)\]", line) for line in done.stdout.splitlines())
    lines = zip(stamped, done.stdout.splitlines(), strict=True)
    return sum(1 for m, line in lines if m and float(m[1]) >= since and ARP_OVERFLOW in line)


# --- one measurement ----------------------------------------------------------------------------


def child_command(
    impl: str, cluster: Cluster, groups: CpuGroups, out: Path, reps: int
) -> list[str]:
    """The measuring process; 0.4.0 resolves host names itself: it gets the cluster's hosts file."""
    python = sys.executable if impl == "ours" else str(ensure_reference_venv())
    launcher_cpu, node_cpu = groups.files()
    cmd = [python, str(HERE / "many_hosts_run.py"), "--hosts", ",".join(cluster.hostnames)]
    cmd += ["--ssh-config", str(cluster.ssh_config), "--reps", str(reps), "--out", str(out)]
    cmd += ["--launcher-cpu", str(launcher_cpu), "--node-cpu", ",".join(map(str, node_cpu))]
    return cmd if impl == "ours" else with_hosts_file(cmd, cluster.hosts_file)


def child_env(impl: str) -> dict[str, str]:
    """Ours from the working tree; both find ``workloads`` in this folder."""
    paths = [str(HERE), str(REPO)] if impl == "ours" else [str(HERE)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_child(
    cmd: list[str], env: dict[str, str], groups: CpuGroups, workdir: Path, timeout: float
) -> str:
    """Run the measuring process in the launcher's cgroup; "" once it exited, else why killed."""
    with (workdir / "output.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        groups.add(groups.launcher, proc.pid)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # 0.4.0's log server, if it outlived its launcher
        proc.wait()
    return ""


def sshd_counts(cluster: Cluster) -> dict[str, int]:
    """Logins and dropped handshakes in the hosts' sshd logs: a retried handshake shows there."""
    counts = {"accepted": 0, "dropped_past_maxstartups": 0, "hosts_with_more_logins_than_one": 0}
    for host in cluster.hostnames:
        log = cluster.state_dir / "nodes" / host / "sshd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        logins = text.count("Accepted publickey")
        counts["accepted"] += logins
        counts["dropped_past_maxstartups"] += text.count("past MaxStartups")
        counts["hosts_with_more_logins_than_one"] += logins > 1
    return counts


def measure(impl: str, hosts: int, reps: int, opts: argparse.Namespace) -> dict[str, Any]:
    """One fresh cluster, one fresh launcher process: its figures, or the error."""
    entry: dict[str, Any] = {"impl": impl, "hosts": hosts, "reps": reps}
    started = time.monotonic()
    with arp_table_for(hosts, opts.keep_arp_limits) as limits:
        entry["arp_limits"] = limits
        entry.update(measure_on_cluster(impl, hosts, reps, opts.timeout))
    entry["arp_overflows_logged"] = arp_overflows(started)
    entry["seconds"] = time.monotonic() - started
    return entry


def measure_on_cluster(impl: str, hosts: int, reps: int, timeout: float) -> dict[str, Any]:
    """Bring up the hosts, put them and the launcher in cgroups, run the measuring process."""
    entry: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trxbench-") as scratch:
        workdir = Path(scratch)
        groups = CpuGroups(hosts)
        try:
            with Cluster.up(hosts, state_dir=workdir / "cluster") as cluster:
                entry["cluster_up_s"] = cluster.up_seconds
                for namespace, node in zip(cluster.namespaces, groups.nodes, strict=True):
                    for pid in netns_pids(namespace):
                        groups.add(node, pid)
                out = workdir / "result.json"
                cmd = child_command(impl, cluster, groups, out, reps)
                killed = run_child(cmd, child_env(impl), groups, workdir, timeout)
                entry["left_on_hosts"] = cluster.wait_no_processes(timeout=LEFTOVER_GRACE_S)
                entry["sshd"] = sshd_counts(cluster)
            entry.update(read_child(out, workdir / "output.log", killed))
        finally:
            entry["left_in_cgroups"] = groups.left()
            groups.remove()
    return entry


def read_child(out: Path, log: Path, killed: str) -> dict[str, Any]:
    """The child's result, or an error with the end of its output."""
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if killed or "summary" not in result:
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        result.setdefault("error", killed or "no result")
        result["output_tail"] = tail
    result["status"] = "error" if "error" in result else "ok"
    return result


# --- aggregation --------------------------------------------------------------------------------


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float | None]]]:
    """Per implementation and host count: the median over rounds of each summary figure."""
    table: dict[str, dict[int, dict[str, float | None]]] = {}
    for impl in TITLES:
        for hosts in sorted({r["hosts"] for r in runs if r["impl"] == impl}):
            ok = [
                r["summary"]
                for r in runs
                if (r["impl"], r["hosts"], r["status"]) == (impl, hosts, "ok")
            ]
            if ok:
                table.setdefault(impl, {})[hosts] = {k: median_of(ok, k) for k, _ in FIELDS}
    return table


def median_of(summaries: list[dict[str, Any]], key: str) -> float | None:
    """Median of one figure over rounds; None where the implementation has no such phase."""
    values = [s[key] for s in summaries if s.get(key) is not None]
    return statistics.median(values) if values else None


def slopes(by_hosts: dict[int, dict[str, float | None]]) -> dict[str, float]:
    """Least-squares slope of each figure over the host counts: the cost of one more host."""
    fitted = {}
    for key in SLOPES:
        points = [(h, v[key]) for h, v in sorted(by_hosts.items()) if v[key] is not None]
        if len(points) >= 2:
            xs, ys = zip(*points, strict=True)
            fitted[key] = statistics.linear_regression(xs, ys).slope
    return fitted


# --- output -------------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    """Seconds below one in ms, like the suite's other tables."""
    if value is None:
        return "n/a"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def table_rows(table: dict[str, dict[int, dict[str, float | None]]]) -> list[str]:
    """The figures as a Markdown table: one row per implementation and host count."""
    head = "| hosts | impl | " + " | ".join(title for _, title in FIELDS) + " |"
    rows = [head, "|" + " --- |" * (len(FIELDS) + 2)]
    for hosts in sorted({h for by in table.values() for h in by}):
        for impl, by in table.items():
            if hosts in by:
                cells = " | ".join(seconds(by[hosts][k]) for k, _ in FIELDS)
                rows.append(f"| {hosts} | {TITLES[impl]} | {cells} |")
    return rows


def report(results: dict[str, Any]) -> None:
    """Print the table, the slopes, and what went wrong."""
    print("\n".join(table_rows(results["table"])))
    for impl, fitted in results["per_host"].items():
        parts = ", ".join(f"{k} {v * 1e3:+.1f} ms" for k, v in fitted.items())
        print(f"{TITLES[impl]}, per extra host: {parts}")
    for run in results["runs"]:
        if run["status"] != "ok" or run.get("left_on_hosts") or run.get("left_in_cgroups"):
            print(
                f"{TITLES[run['impl']]} {run['hosts']} hosts: {run.get('error', 'processes left')}"
            )


def draw(results: dict[str, Any], png: Path) -> None:
    """Wall times (left) and CPU per later run (right) against the host count."""
    import matplotlib as mpl  # noqa: PLC0415 -- optional: only drawing needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (wall, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    # one colour per figure, one marker and line style per implementation
    palette = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    colors = dict(zip((k for k, _ in FIELDS), palette, strict=False))
    styles = {"ours": {"marker": "o"}, "040": {"marker": "x", "linestyle": ":"}}
    for impl, by in results["table"].items():
        for ax, keys in ((wall, FIELDS[:3]), (cpu, FIELDS[3:5])):
            for key, title in keys:
                points = sorted((int(h), v[key]) for h, v in by.items() if v[key] is not None)
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = f"{title} ({TITLES[impl]})"
                    ax.plot(xs, ys, label=label, color=colors[key], **styles[impl])
    counts = sorted({int(h) for by in results["table"].values() for h in by})
    for ax in (wall, cpu):  # log-log: a cost linear in the hosts is a line of slope 1
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_yscale("log")
    wall.set_ylabel("seconds (wall)")
    cpu.set_ylabel("CPU seconds per later run")
    cores = results["machine"].get("cpus_usable")
    for ax, title in ((wall, "wall time"), (cpu, f"CPU per later run ({cores} cores shared)")):
        ax.set_xlabel("hosts (1 gloo worker each)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --- main ---------------------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; empty for ``""``."""
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=counts, default=[1, 4, 8, 16, 32], help="host counts")
    parser.add_argument("--reps", type=int, default=10, help="later runs per launcher")
    parser.add_argument("--rounds", type=int, default=3, help="fresh launchers per host count")
    parser.add_argument("--ref-hosts", type=counts, default=[16, 32], help="0.4.0's host counts")
    parser.add_argument("--ref-reps", type=int, default=2, help="0.4.0's later runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound of each launcher")
    parser.add_argument("--output", type=Path, default=HERE / "results-many-hosts.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "many-hosts.png")
    parser.add_argument("--draw", action="store_true", help="only redraw --png from --output")
    parser.add_argument(
        "--keep-arp-limits", action="store_true", help="leave the neighbour table's limits alone"
    )
    return parser.parse_args()


def plan(opts: argparse.Namespace) -> Iterator[tuple[str, int, int]]:
    """(implementation, hosts, later runs) of every measurement, in order."""
    for hosts in opts.hosts:
        for _ in range(opts.rounds):
            yield "ours", hosts, opts.reps
    for hosts in opts.ref_hosts:
        yield "040", hosts, opts.ref_reps


def main() -> None:
    """Measure (unless ``--draw``), write the JSON, print the table, draw the PNG."""
    opts = parse_args()
    # a SIGTERM unwinds like an exception: the cluster, the cgroups and the ARP limits are undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if opts.draw:
        draw(json.loads(opts.output.read_text()), opts.png)
        return
    runs = []
    for impl, hosts, reps in plan(opts):
        print(f"{TITLES[impl]}: {hosts} hosts ...", file=sys.stderr, flush=True)
        runs.append(measure(impl, hosts, reps, opts))
    table = aggregate(runs)
    results = {
        "table": table,
        "per_host": {impl: slopes(by) for impl, by in table.items() if len(by) >= 2},
        "runs": runs,
        "machine": machine_info(),
        "git": git_info(),
        "options": {k: vars(opts)[k] for k in OPTIONS},
    }
    opts.output.write_text(json.dumps(results, indent=1))
    report(results)
    try:
        draw(results, opts.png)
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
