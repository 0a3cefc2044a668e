"""What ``RunHandle.status()`` costs: ``python -m benchmarks.status_cost [HOSTS] [WORKERS]``.

Run from the repository root, as root (the test hosts of ``testbed/cluster.py``): a run of
HOSTS x WORKERS gloo workers (default 3 x 8) that each count for 6 s; one launcher asks for
the status every second (or never, the baseline). Prints the median time of a call, and the
run's duration with and without the calls (the counting is what would be slowed).
"""

from __future__ import annotations

import statistics
import sys
import time

import torchrunx
from testbed.cluster import Cluster

SECONDS = 6.0


def count(seconds: float) -> int:
    """Count for ``seconds``: the work that status calls must not slow."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
    return n


def main() -> None:
    """Bring up the hosts, run with and without status calls, print the figures."""
    hosts = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    with Cluster.up(hosts) as cluster:
        launcher = torchrunx.Launcher(
            hostnames=cluster.hostnames, workers_per_host=workers, backend="gloo",
            ssh_config_file=cluster.ssh_config, log_dir="",
        )  # fmt: skip
        with launcher:
            launcher.run(int)
            quiet = sum(launcher.run(count, SECONDS).by_rank())
            handle = launcher.submit(count, SECONDS)
            calls = []
            while not handle.done():
                start = time.perf_counter()
                status = handle.status()
                calls.append(time.perf_counter() - start)
                time.sleep(1)
            asked = sum(handle.result().by_rank())
    print(f"{hosts} hosts x {workers} workers; {len(status)} ranks in the last status")
    median, worst = statistics.median(calls) * 1e3, max(calls) * 1e3
    print(f"status(): median {median:.1f} ms, max {worst:.1f} ms")
    print(f"work done with a status every second: {asked / quiet:.1%} of that without")


if __name__ == "__main__":
    main()
