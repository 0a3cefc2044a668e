"""No false alarms under load: the heartbeats the launcher hears while every core is busy.

``python -m benchmarks.heartbeat_load [--seconds 60] [--workers 2] [--load 4]``, as root, from
the repository root.

Part 1, load: 3 test hosts of ``testbed/cluster.py`` (network namespaces with an sshd each, on
this machine's cores), one launcher with the default ``heartbeat_timeout`` (10 s) and
``--workers`` gloo workers per host, warmed up by a noop run. Then ``--load`` more processes
(``python -c 'while True: pass'``) start on this machine, and a run whose every rank busy-loops
on the CPU for ``--seconds``. Meanwhile a thread of this process polls, every 50 ms, each
agent's ``AgentHandle.last_seen`` (the launcher's monotonic time of the last message it took
from the agent: a heartbeat every second, or anything else) and ``failure``, and the controller
thread's last tick. Reported, per agent: the largest gap between two successive ``last_seen``
values, and between the polls that saw them change (the same, to the 50 ms of the polling and
the polling thread's own delays); the agents declared lost (``failure`` set) and the run's
outcome (it must return: 0 agents lost). The controller thread's largest gap between ticks and
the polling thread's largest gap between polls are noted too: when the controller thread does
not run for more than 2 s, it adds that time to every ``last_seen``, so that no agent is
blamed for the launcher's own stall; such a stall shows there.

Part 2, partition (``--partitions`` times, default 1, without the extra load): a fresh launcher
on 2 of the hosts with the default ``heartbeat_timeout``, a noop run, then a run whose ranks
sleep; once every rank is in it, ``Cluster.partition`` drops all traffic of the second host.
Reported: the time from the partition to ``AgentFailedError`` out of the run, to the agent's
``failure`` (seen by the polling thread), and from its last ``last_seen`` before the partition
to that failure (the bound is counted from there).

Every wait is bounded; the extra load, the launchers and the cluster are torn down whatever
happens (also on SIGTERM), and whatever still runs on the hosts 5 s after is reported and
killed. Writes ``--output`` (JSON: every gap, per agent).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.ranks import wait_running

if TYPE_CHECKING:
    import torchrunx
    from testbed.cluster import Cluster
    from torchrunx.pool import AgentPool

HERE = Path(__file__).resolve().parent
HOSTS = 3
POLL_S = 0.05
HEARTBEAT_TIMEOUT_S = 10.0  # the default, which the launchers here keep: checked at the start
RUN_MARGIN_S = 120.0  # beyond --seconds, for the loaded run to return
RUNNING_TIMEOUT_S = 60.0  # from submitting a run to every rank in it
PARTITION_WAIT_S = 60.0  # from the partition to the run's AgentFailedError
LEFTOVER_GRACE_S = 5.0
LOAD_CODE = "while True: pass"


# --- in the workers -----------------------------------------------------------------------------


def noop() -> None:
    """The warm-up run."""


def spin(seconds: float) -> int:
    """Busy-loop on the CPU for ``seconds``; the loop's count."""
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        count += 1
    return count


def sleep(seconds: float) -> None:
    """Sleep (the partitioned run: it never ends by itself within the wait)."""
    time.sleep(seconds)


# --- watching the agents from a thread ----------------------------------------------------------


@dataclass
class AgentTrace:
    """What the polls saw of one agent: its ``last_seen`` values' gaps, its failure."""

    hostname: str
    identity: bytes
    last_value: float
    last_change: float  # monotonic time of the poll that saw it change
    value_gaps: list[float] = field(default_factory=list)
    observed_gaps: list[float] = field(default_factory=list)
    failure: str | None = None
    failed_at: float | None = None  # monotonic time of the poll that saw it


class Watch:
    """Polls a pool's agents every 50 ms on a thread of its own, until :meth:`stop`."""

    def __init__(self, pool: AgentPool) -> None:
        self.pool = pool
        self.agents: dict[int, AgentTrace] = {}
        self.replaced: list[AgentTrace] = []  # agents that another took the place of
        self.poll_gaps: list[float] = []
        self.tick_gaps: list[float] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="heartbeat-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (bounded)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        last_poll = time.monotonic()
        controller = self.pool.controller
        last_tick = controller._last_tick  # noqa: SLF001 -- the controller thread's last tick
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            self.poll_gaps.append(now - last_poll)
            last_poll = now
            tick = controller._last_tick  # noqa: SLF001
            if tick != last_tick:
                self.tick_gaps.append(tick - last_tick)
                last_tick = tick
            for i, agent in enumerate(list(self.pool.agents)):
                if agent is not None:
                    self._look(i, agent, now)

    def _look(self, i: int, agent: Any, now: float) -> None:
        trace = self.agents.get(i)
        if trace is None or trace.identity != agent.identity:
            if trace is not None:
                self.replaced.append(trace)
            trace = AgentTrace(agent.hostname, agent.identity, agent.last_seen, now)
            self.agents[i] = trace
        seen = agent.last_seen
        if seen != trace.last_value:
            trace.value_gaps.append(seen - trace.last_value)
            trace.observed_gaps.append(now - trace.last_change)
            trace.last_value, trace.last_change = seen, now
        if agent.failure is not None and trace.failure is None:
            trace.failure, trace.failed_at = agent.failure, now

    def traces(self) -> list[AgentTrace]:
        """Every agent polled, those replaced included."""
        return [*self.replaced, *self.agents.values()]


# --- the cases ----------------------------------------------------------------------------------


def launcher_on(cluster: Cluster, hosts: list[str], workers: int) -> torchrunx.Launcher:
    """A launcher on ``hosts`` of the cluster with the default ``heartbeat_timeout``."""
    import torchrunx  # noqa: PLC0415

    launcher = torchrunx.Launcher(
        hostnames=hosts, workers_per_host=workers, backend="gloo",
        ssh_config_file=cluster.ssh_config, log_dir="",
    )  # fmt: skip
    if launcher.heartbeat_timeout != HEARTBEAT_TIMEOUT_S:
        msg = f"the default heartbeat_timeout is {launcher.heartbeat_timeout}, not 10 s"
        raise RuntimeError(msg)
    return launcher


def pool_of(launcher: torchrunx.Launcher) -> AgentPool:
    """The launcher's agents (after a run)."""
    pool = launcher._pool  # noqa: SLF001 -- the agents' last_seen: what this measures
    if pool is None:
        msg = "the launcher has no agents after a run"
        raise RuntimeError(msg)
    return pool


def start_load(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` busy processes on this machine (killed by :func:`stop_load`)."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_CODE], stdin=subprocess.DEVNULL, start_new_session=True
        )
        for _ in range(count)
    ]


def stop_load(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill the busy processes (by pid) and reap them."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def under_load(cluster: Cluster, opts: argparse.Namespace) -> dict[str, Any]:
    """Part 1: ``--seconds`` of busy ranks and busy processes; the gaps, the agents lost."""
    here = importlib.import_module("benchmarks.heartbeat_load")
    found: dict[str, Any] = {"workers": opts.workers, "load": opts.load, "seconds": opts.seconds}
    load: list[subprocess.Popen[bytes]] = []
    watch = None
    with launcher_on(cluster, cluster.hostnames, opts.workers) as launcher:
        try:
            launcher.run(here.noop)
            pool = pool_of(launcher)
            load = start_load(opts.load)
            watch = Watch(pool)
            started = time.monotonic()
            handle = launcher.submit(here.spin, opts.seconds)
            try:
                counts = handle.result(timeout=opts.seconds + RUN_MARGIN_S).by_rank()
                found["outcome"] = f"returned: {len(counts)} ranks spun"
                found["spins"] = counts
            except Exception as e:  # noqa: BLE001 -- the outcome is the finding
                found["outcome"] = f"raised {type(e).__name__}: {str(e).splitlines()[0]}"
            found["run_s"] = time.monotonic() - started
            found["loadavg"] = os.getloadavg()
        finally:
            if watch is not None:
                watch.stop()
            stop_load(load)
    if watch is not None:
        found.update(report_watch(watch))
    return found


def report_watch(watch: Watch) -> dict[str, Any]:
    """The per-agent gaps, the failures, and the polling thread's and controller's own gaps."""
    agents = [
        {
            "hostname": t.hostname,
            "heartbeats": len(t.value_gaps),
            "max_gap_s": max(t.value_gaps, default=None),
            "max_observed_gap_s": max(t.observed_gaps, default=None),
            "gaps_over_2s": sum(g > 2 for g in t.value_gaps),
            "failure": t.failure,
            "value_gaps_s": t.value_gaps,
        }
        for t in watch.traces()
    ]
    return {
        "agents": agents,
        "lost": sum(t.failure is not None for t in watch.traces()),
        "max_poll_gap_s": max(watch.poll_gaps, default=None),
        "max_controller_tick_gap_s": max(watch.tick_gaps, default=None),
    }


def partitioned(cluster: Cluster) -> dict[str, Any]:
    """Part 2: the second of 2 hosts partitioned mid-run; how long until the launcher says so."""
    import torchrunx  # noqa: PLC0415

    here = importlib.import_module("benchmarks.heartbeat_load")
    hosts = cluster.hostnames[:2]
    found: dict[str, Any] = {}
    watch = None
    try:
        with launcher_on(cluster, hosts, 1) as launcher:
            launcher.run(here.noop)
            pool = pool_of(launcher)
            watch = Watch(pool)
            handle = launcher.submit(here.sleep, PARTITION_WAIT_S + RUNNING_TIMEOUT_S)
            wait_running(handle, len(hosts), RUNNING_TIMEOUT_S)
            agent = pool.agents[1]
            if agent is None:
                msg = "no agent on the second host"
                raise RuntimeError(msg)
            before = agent.last_seen
            cut = time.monotonic()
            cluster.partition(1)
            try:
                handle.result(timeout=PARTITION_WAIT_S)
            except torchrunx.AgentFailedError as e:
                found["raised_s"] = time.monotonic() - cut
                found["raised"] = f"AgentFailedError: {str(e).splitlines()[0]}"
                found["hostname"] = e.hostname
            except Exception as e:  # noqa: BLE001 -- the wrong outcome is the finding
                found["raised"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                found["raised"] = "the run returned"
            finally:
                cluster.heal(1)
            watch.stop()
            trace = watch.agents.get(1)
            if trace is not None and trace.failed_at is not None:
                found["failure_s"] = trace.failed_at - cut
                found["last_seen_to_failure_s"] = trace.failed_at - before
                found["failure"] = trace.failure
    finally:
        if watch is not None:
            watch.stop()
        cluster.heal(1)
    return found


# --- the report ---------------------------------------------------------------------------------


def secs(value: float | None) -> str:
    """Seconds, three significant figures; ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.3g} s"


def summary(load: dict[str, Any] | None, parts: list[dict[str, Any]]) -> list[str]:
    """The gaps per agent against the bound; the partitions' times."""
    lines = []
    if load is not None:
        outcome = load.get("outcome", load.get("error", "no outcome"))
        loadavg = ", ".join(f"{x:.1f}" for x in load.get("loadavg", ()))
        header = "| agent | heartbeats seen | largest gap (last_seen) | largest gap (polls) |"
        lines += [
            (
                f"under load: {HOSTS} hosts x {load['workers']} busy ranks + {load['load']} busy "
                f"processes, {load['seconds']:g} s, heartbeat_timeout {HEARTBEAT_TIMEOUT_S:g} s; "
                f"{outcome}; load average {loadavg}"
            ),
            "",
            header + " gaps > 2 s | bound | lost |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for a in load.get("agents", []):
            lost = "yes" if a["failure"] else "no"
            lines.append(
                f"| {a['hostname']} | {a['heartbeats']} | {secs(a['max_gap_s'])} | "
                f"{secs(a['max_observed_gap_s'])} | {a['gaps_over_2s']} | "
                f"{HEARTBEAT_TIMEOUT_S:g} s | {lost} |"
            )
        polls, ticks = secs(load.get("max_poll_gap_s")), secs(load.get("max_controller_tick_gap_s"))
        lines += [
            "",
            f"agents declared lost: {load.get('lost', 'n/a')} (must be 0)",
            (
                f"polling thread's largest gap between polls: {polls}; controller thread's "
                f"largest gap between ticks: {ticks}"
            ),
        ]
        lines += [
            f"  {a['hostname']}: {a['failure']}" for a in load.get("agents", []) if a["failure"]
        ]
    for i, p in enumerate(parts):
        lines += [
            "",
            f"partition {i + 1}: {p.get('raised', p.get('error'))}",
            (
                f"  partition -> AgentFailedError: {secs(p.get('raised_s'))}; partition -> "
                f"agent failed: {secs(p.get('failure_s'))}; its last message before -> failed: "
                f"{secs(p.get('last_seen_to_failure_s'))} (bound {HEARTBEAT_TIMEOUT_S:g} s)"
            ),
        ]
        if p.get("left_running"):
            lines.append(f"  left running: {p['left_running']}")
    raised = [p["raised_s"] for p in parts if "raised_s" in p]
    if len(raised) > 1:
        import statistics  # noqa: PLC0415 -- not in the workers, which import this module

        middle, low, high = statistics.median(raised), min(raised), max(raised)
        lines.append(f"\npartition -> AgentFailedError over {len(raised)} partitions: median ")
        lines[-1] += f"{secs(middle)} ({secs(low)}-{secs(high)})"
    if load is not None and load.get("left_running"):
        lines.append(f"left running after the load: {load['left_running']}")
    return lines


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.heartbeat_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="of busy ranks (60)")
    parser.add_argument("--workers", type=int, default=2, help="busy ranks per host (2)")
    parser.add_argument("--load", type=int, default=4, help="extra busy processes (4)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions timed (1)")
    parser.add_argument("--skip-load", action="store_true", help="only the partitions")
    parser.add_argument(
        "--output", type=Path, default=HERE / "results-heartbeat-load.json", help="JSON file"
    )
    return parser.parse_args()


def main() -> None:
    """Both parts on one cluster, torn down whatever happens."""
    opts = parse_args()
    from testbed.cluster import Cluster  # noqa: PLC0415 -- needs root and cryptography

    # a SIGTERM unwinds like an exception: the load, the launchers and the cluster are undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    load = None
    parts: list[dict[str, Any]] = []
    with Cluster.up(HOSTS) as cluster:  # its own temporary folder, removed with it
        if not opts.skip_load:
            print(f"under load, {opts.seconds:g} s ...", file=sys.stderr, flush=True)
            try:
                load = under_load(cluster, opts)
            except Exception as e:  # noqa: BLE001 -- reported with the rest
                load = {"error": f"{type(e).__name__}: {e}", **vars(opts)}
            load["left_running"] = cluster.reset(wait=LEFTOVER_GRACE_S)
        for i in range(opts.partitions):
            print(f"partition {i + 1}/{opts.partitions} ...", file=sys.stderr, flush=True)
            try:
                part = partitioned(cluster)
            except Exception as e:  # noqa: BLE001 -- reported with the rest
                part = {"error": f"{type(e).__name__}: {e}"}
            part["left_running"] = cluster.reset(wait=LEFTOVER_GRACE_S)
            parts.append(part)
    options = {k: vars(opts)[k] for k in ("seconds", "workers", "load", "partitions")}
    result = {"load": load, "partitions": parts, "options": options}
    opts.output.write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(summary(load, parts)))


if __name__ == "__main__":
    main()
