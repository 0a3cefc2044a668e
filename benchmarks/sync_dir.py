"""What ``sync_dir`` costs: ``python -m benchmarks.sync_dir [HOSTS ...] [--reps N]``.

Run from the repository root, as root (the test hosts of ``testbed/cluster.py``, each in a mount
namespace where the project's folder and ``~/.cache/torchrunx`` are its own, empty at first).
The project: 50 MB, 2,000 source files of about 12 KB and three 10 MB binaries (random, so
incompressible). For each host count (default 4 and 8), median of ``--reps`` (default 3):

- ``first``: a copy to hosts that have none (the launcher's code path: one SSH channel per
  host on the connection that starts its agent, all hosts at once);
- ``offer, nothing new``: a new launcher offering the same folder to hosts that hold it;
- ``unchanged``: what a later ``run()`` pays with ``sync_dir`` on a warm launcher (the walk),
  next to the same run without it;
- ``one file edited``: a later ``run()`` after one source file changed;
- ``rsync``: ``rsync -a --delete`` over OpenSSH to every host at once, first and unchanged:
  what a user without ``sync_dir`` does before each run.

The hosts share this machine's 2 cores: each host's sshd and receiver run beside the others.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torchrunx
from testbed.cluster import Cluster
from torchrunx.sync import Folder, copy_over_ssh
from torchrunx.transport.ssh import Interpreter, open_ssh

if TYPE_CHECKING:
    from collections.abc import Callable

SOURCES, SOURCE_LINES, BINARIES, BINARY_MB = 2000, 120, 3, 10
RSYNC_DIR = ".cache/torchrunx/rsync-copy"  # in the remote home, beside our copies: private there


def make_project(root: Path) -> int:
    """The project; its size in bytes."""
    rng = random.Random(0)
    words = [f"name{i}" for i in range(5000)]
    for i in range(SOURCES):
        path = root / f"pkg{i // 100}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (" ".join(rng.choices(words, k=12)) for _ in range(SOURCE_LINES))
        path.write_text(f"# module {i}\n" + "\n".join(lines))
    for i in range(BINARIES):
        (root / f"weights{i}.bin").write_bytes(os.urandom(BINARY_MB << 20))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def tool(name: str) -> str:
    """The path of a command-line tool (it must be there)."""
    path = shutil.which(name)
    if path is None:
        sys.exit(f"needs {name} (apt-get install {name})")
    return path


def on_nodes(cluster: Cluster, command: str) -> None:
    """Run ``command`` on every node at once (over OpenSSH, as a user would)."""
    procs = [
        subprocess.Popen([tool("ssh"), "-F", str(cluster.ssh_config), host, command])
        for host in cluster.hostnames
    ]
    for p in procs:
        p.wait(timeout=300)


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def copy_to_all(cluster: Cluster, folder: Folder) -> None:
    """The launcher's copy: one snapshot, then every host at once over its SSH connection."""
    snapshot = folder.snapshot()
    connections = [open_ssh(h, cluster.ssh_config, 60) for h in cluster.hostnames]
    try:
        python = Interpreter(sys.executable)
        with concurrent.futures.ThreadPoolExecutor(len(connections)) as pool:
            jobs = [
                pool.submit(copy_over_ssh, c, h, python, snapshot, 120)
                for c, h in zip(connections, cluster.hostnames, strict=True)
            ]
            for job in jobs:
                job.result()
    finally:
        for c in connections:
            c.close()


def rsync_to_all(cluster: Cluster, project: Path) -> None:
    """What a user does without ``sync_dir``: rsync to every host at once."""
    ssh = f"ssh -F {cluster.ssh_config}"
    rsync = [tool("rsync"), "-a", "--delete", "-e", ssh, f"{project}/"]
    procs = [subprocess.Popen([*rsync, f"{h}:{RSYNC_DIR}/"]) for h in cluster.hostnames]
    for p in procs:
        if p.wait(timeout=300) != 0:
            msg = f"rsync exited with {p.returncode}"
            raise RuntimeError(msg)


def noop() -> None:
    """The run whose time is measured."""


def later_runs(cluster: Cluster, reps: int, sync: Path | None) -> float:
    """Median later run of ``noop`` on a warm launcher, with ``sync_dir=sync`` or without."""
    launcher = torchrunx.Launcher(
        hostnames=cluster.hostnames, workers_per_host=1, backend=None,
        ssh_config_file=cluster.ssh_config, log_dir="", sync_dir=sync or False,
    )  # fmt: skip
    with launcher:
        launcher.run(noop)
        return statistics.median(timed(lambda: launcher.run(noop)) for _ in range(reps))


def edited_runs(cluster: Cluster, project: Path, reps: int) -> float:
    """Median later run right after one source file changed."""
    launcher = torchrunx.Launcher(
        hostnames=cluster.hostnames, workers_per_host=1, backend=None,
        ssh_config_file=cluster.ssh_config, log_dir="", sync_dir=project,
    )  # fmt: skip
    edited = project / "pkg0" / "mod0.py"
    times = []
    with launcher:
        launcher.run(noop)
        for i in range(reps):
            edited.write_text(edited.read_text() + f"\n# edit {i}")
            times.append(timed(lambda: launcher.run(noop)))
    return statistics.median(times)


def measure(hosts: int, reps: int, projects: Path, project: Path) -> dict[str, Any]:
    """Every figure for one host count."""
    cache = Path.home() / ".cache" / "torchrunx"
    cache.mkdir(parents=True, exist_ok=True)
    with Cluster.up(hosts, private=[projects, cache]) as cluster:
        first, again, rsync_first, rsync_again = [], [], [], []
        for _ in range(reps):
            on_nodes(cluster, f"rm -rf ~/.cache/torchrunx/copies ~/{RSYNC_DIR}")
            first.append(timed(lambda: copy_to_all(cluster, Folder(project))))
            again.append(timed(lambda: copy_to_all(cluster, Folder(project))))
            rsync_first.append(timed(lambda: rsync_to_all(cluster, project)))
            rsync_again.append(timed(lambda: rsync_to_all(cluster, project)))
        folder = Folder(project)
        folder.snapshot()
        return {
            "hosts": hosts,
            "first_s": statistics.median(first),
            "offer_nothing_new_s": statistics.median(again),
            "walk_unchanged_s": statistics.median(timed(folder.snapshot) for _ in range(reps)),
            "later_run_synced_s": later_runs(cluster, 5 * reps, project),
            "later_run_plain_s": later_runs(cluster, 5 * reps, None),
            "later_run_one_edit_s": edited_runs(cluster, project, 5 * reps),
            "rsync_first_s": statistics.median(rsync_first),
            "rsync_unchanged_s": statistics.median(rsync_again),
        }


def main() -> None:
    """Make the project, measure each host count, write and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results-sync-dir.json")
    args = parser.parse_args()
    tool("rsync")
    output = Path(args.output).resolve()
    projects = Path(tempfile.mkdtemp(prefix="trx-sync-bench-"))
    try:
        project = projects / "project"
        size = make_project(project)
        # the plain runs start agents in the working directory: one the hosts also see
        os.chdir(tempfile.gettempdir())
        rows = [measure(n, args.reps, projects, project) for n in args.hosts]
    finally:
        shutil.rmtree(projects, ignore_errors=True)
    report = {"project_bytes": size, "reps": args.reps, "rows": rows}
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
