"""From a preemption signal to every rank's ``preempted()``.

``python -m benchmarks.preempt_latency [--reps N] [--hosts N] [--workers 1,2]``, from the
repository root.

As root for the test hosts (``--skip-hosts``: without them). These cases, each ``--reps`` times:

* ``local/launcher``: localhost, 2 gloo workers; SIGTERM to the launcher's process;
* ``local/agent``: the same; SIGTERM to the agent;
* ``hosts/agent``: ``--hosts`` test hosts of ``testbed/cluster.py`` (default 3) with 1, then 2
  gloo workers each (``--workers``); SIGTERM to the agent of ``node1`` (the hosts share this
  machine's PID namespace and clock).

A notice is sticky for a launcher (a run started after it sees it at once), so every repetition
is a fresh launcher in a fresh process (this module, ``--child``): it starts its agents, runs a
noop (the agents and their forkservers are warm), submits the measured run and says so once
every rank is in it. Each rank spins on ``torchrunx.preempted()`` (``time.sleep`` of 0.5 ms
between checks) and returns ``time.time()`` when it turns True. This process sends the signal;
a repetition's latency is the latest rank's time minus the time the signal was sent. Nothing is
subtracted. The launcher's process also notes when its signal handler ran (``launcher`` case)
and when its controller thread took the preemption (``controller.preempt``, which sends the
notice to every agent), which splits the latency in two hops: signal -> controller, and
controller -> the latest rank.

Prints the median and range per case against the targets (<= 100 ms on one host, <= 300 ms on
the test hosts) and writes ``--output`` (JSON: every repetition, per rank and per hop).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torchrunx
from benchmarks.ranks import wait_running

if TYPE_CHECKING:
    from collections.abc import Callable

    from testbed.cluster import Cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPIN_S = 0.0005  # a rank's sleep between two checks of preempted()
SIGNAL = "SIGTERM"
GRACE_S = 20.0  # the ranks return at their notice: the grace never ends a run here
SETTLE_S = 0.3  # between "every rank is in the run" and the signal
READY_TIMEOUT_S = 150.0  # a fresh launcher: agents up (over ssh), a noop run, the measured run
RUNNING_TIMEOUT_S = 60.0  # (of which) from submitting the measured run to every rank in it
NOTICE_TIMEOUT_S = 30.0  # from the signal to the launcher's PreemptedError
EXIT_TIMEOUT_S = 30.0  # from its report to the launcher process's exit
LEFTOVER_GRACE_S = 5.0
TARGETS_S = {"local": 0.100, "hosts": 0.300}
COMPARISON = (
    "torchrun forwards SIGTERM to its workers but gives them no notice; torchrunx 0.4.0 has "
    "no preemption notice: neither has an equivalent to measure."
)


# --- in the workers -----------------------------------------------------------------------------


def noop() -> None:
    """The warm-up run."""


def until_preempted(limit: float) -> dict[str, float] | None:
    """Spin on ``preempted()``; ``time.time()`` when it turned True (None after ``limit`` s).

    And when the worker's listening thread took the notice (``flag``): ``preemption.notice``,
    which it calls, is wrapped for that; the difference is this loop's (its sleep's) share.
    """
    from torchrunx import preemption  # noqa: PLC0415

    flagged: list[float] = []
    take = preemption.notice

    def notice() -> None:
        flagged.append(time.time())
        take()

    preemption.notice = notice
    deadline = time.monotonic() + limit
    while not torchrunx.preempted():
        if time.monotonic() > deadline:
            return None
        time.sleep(SPIN_S)
    seen = time.time()
    return {"seen": seen, "flag": flagged[0] if flagged else seen}


# --- the launcher's process (--child) -----------------------------------------------------------


def stamping(stamps: dict[str, float], key: str, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call``, noting in ``stamps[key]`` when it was first called (and ``key_end`` returned)."""

    def stamped(*args: Any) -> Any:
        stamps.setdefault(key, time.time())
        try:
            return call(*args)
        finally:
            stamps.setdefault(f"{key}_end", time.time())

    return stamped


def child(opts: argparse.Namespace) -> None:
    """One repetition's launcher: warm agents, the measured run, its report on ``--report-fd``."""
    with os.fdopen(opts.report_fd, "w") as report:

        def say(**fields: Any) -> None:
            report.write(json.dumps(fields) + "\n")
            report.flush()

        try:
            measured_run(opts, say)
        except Exception as e:  # noqa: BLE001 -- reported to the driver, which prints it
            say(error=f"{type(e).__name__}: {e}")


def measured_run(opts: argparse.Namespace, say: Callable[..., None]) -> None:
    """Start the agents, run a noop, submit the measured run, report; its notice's times."""
    # the workers' functions by reference to this module, not by value from __main__
    here = importlib.import_module("benchmarks.preempt_latency")
    hosts, (workers,) = opts.hostnames.split(","), opts.workers
    launcher = torchrunx.Launcher(
        hostnames=hosts, workers_per_host=workers, backend="gloo",
        ssh_config_file=opts.ssh_config, log_dir="", preempt_signals=(SIGNAL,),
        preempt_grace=GRACE_S,
    )  # fmt: skip
    with launcher:
        launcher.run(here.noop)
        pool = launcher._pool  # noqa: SLF001 -- the agents' pids, and the hops' times
        if pool is None:
            msg = "the launcher has no agents after a run"
            raise RuntimeError(msg)
        stamps: dict[str, float] = {}
        controller = pool.controller
        controller.preempt = stamping(stamps, "controller", controller.preempt)  # type: ignore[method-assign]
        pool.signals._on_signal = stamping(stamps, "handler", pool.signals._on_signal)  # noqa: SLF001
        ranks = len(hosts) * workers
        handle = launcher.submit(here.until_preempted, NOTICE_TIMEOUT_S + READY_TIMEOUT_S)
        wait_running(handle, ranks, RUNNING_TIMEOUT_S)
        agents = [a.facts.pid for a in pool.agents if a is not None and a.facts is not None]
        say(ready=True, launcher=os.getpid(), agents=agents)
        try:
            handle.result(timeout=NOTICE_TIMEOUT_S + SETTLE_S)
        except torchrunx.PreemptedError as e:
            noticed = {str(rank): t for rank, t in e.partial_results.items()}
            say(noticed=noticed, ranks=ranks, signals=e.signals, stamps=stamps)
        else:
            say(error="the run returned without a notice")


# --- the driver ---------------------------------------------------------------------------------


class Where:
    """A case's hosts: their names, workers per host, and the test hosts' cluster (or None)."""

    def __init__(self, hosts: list[str], workers: int, cluster: Cluster | None = None) -> None:
        self.hosts, self.workers, self.cluster = hosts, workers, cluster


class Child:
    """One repetition's launcher process, its report pipe and its output file."""

    def __init__(self, where: Where, log: IO[bytes]) -> None:
        read, write = os.pipe()
        cmd = [sys.executable, "-m", "benchmarks.preempt_latency", "--child"]
        cmd += ["--hostnames", ",".join(where.hosts), "--workers", str(where.workers)]
        cmd += ["--report-fd", str(write)]
        if where.cluster is not None:
            cmd += ["--ssh-config", str(where.cluster.ssh_config)]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(write,), start_new_session=True,
        )  # fmt: skip
        os.close(write)
        self.reports = os.fdopen(read, "rb")
        self.buffer = b""

    def next_report(self, timeout: float) -> dict[str, Any]:
        """The next line it reports, within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"no report from the launcher's process within {timeout:g} s"
                raise TimeoutError(msg)
            if select.select([self.reports], [], [], left)[0]:
                chunk = os.read(self.reports.fileno(), 65536)
                if not chunk:
                    code = self.proc.wait(EXIT_TIMEOUT_S)
                    msg = f"the launcher's process exited (code {code}) without reporting"
                    raise RuntimeError(msg)
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        report: dict[str, Any] = json.loads(line)
        if "error" in report:
            raise RuntimeError(report["error"])
        return report

    def end(self, wait: float) -> int | None:
        """Wait up to ``wait`` s for its exit, then kill whatever is left of its process group."""
        code = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.proc.wait(wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reports.close()
        return code


def local_tree(pid: int) -> list[int]:
    """``pid``'s descendants (this machine's agents, forkservers, workers, ssh clients)."""
    import psutil  # noqa: PLC0415 -- the driver's only

    with contextlib.suppress(psutil.NoSuchProcess):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


def leftovers(pids: list[int], cluster: Cluster | None) -> list[str]:
    """What of ``pids`` (and on the test hosts) still runs after a grace; killed, by pid."""
    import psutil  # noqa: PLC0415

    deadline = time.monotonic() + LEFTOVER_GRACE_S
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)]
        time.sleep(0.05)
    left = []
    for pid in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    if cluster is not None:
        left += cluster.reset(wait=LEFTOVER_GRACE_S)  # what it finds there it kills
    return left


def repetition(case: str, where: Where, log: IO[bytes]) -> dict[str, Any]:
    """One fresh launcher: the signal, every rank's notice, the hops; or the error."""
    entry: dict[str, Any] = {"case": case}
    child_proc = Child(where, log)
    tree: list[int] = []
    wait = 0.0  # interrupted (Ctrl-C, SIGTERM): no waiting for it
    try:
        ready = child_proc.next_report(READY_TIMEOUT_S)
        tree = local_tree(child_proc.proc.pid)
        target = ready["launcher"] if "/launcher" in case else ready["agents"][0]
        time.sleep(SETTLE_S)
        sent = time.time()
        os.kill(target, signal.Signals[SIGNAL])
        done = child_proc.next_report(NOTICE_TIMEOUT_S + EXIT_TIMEOUT_S)
        entry.update(hops(sent, done))
        wait = EXIT_TIMEOUT_S
    except Exception as e:  # noqa: BLE001 -- this repetition's error, in the report
        entry["error"] = f"{type(e).__name__}: {e}"
        wait = EXIT_TIMEOUT_S
    finally:
        entry["exit_code"] = child_proc.end(wait)
        entry["left_running"] = leftovers(tree, where.cluster)
    return entry


def hops(sent: float, done: dict[str, Any]) -> dict[str, Any]:
    """The latency (latest rank - signal) and its hops, from a launcher's report."""
    returned = {int(r): v for r, v in done["noticed"].items() if v is not None}
    noticed = {r: v["seen"] for r, v in returned.items()}
    if len(noticed) < done["ranks"]:
        missing = sorted(set(range(done["ranks"])) - set(noticed))
        msg = f"ranks {missing} had no notice: {done}"
        raise RuntimeError(msg)
    last = max(noticed.values())
    stamps = done["stamps"]
    found: dict[str, Any] = {
        "latency_s": last - sent,
        "per_rank_s": {r: t - sent for r, t in sorted(noticed.items())},
        "spread_s": last - min(noticed.values()),
        "signals": done["signals"],
    }
    found["flag_to_seen_s"] = max(v["seen"] - v["flag"] for v in returned.values())
    if "handler" in stamps:
        found["signal_to_handler_s"] = stamps["handler"] - sent
    if "controller" in stamps:
        found["signal_to_controller_s"] = stamps["controller"] - sent
        found["controller_to_last_rank_s"] = last - stamps["controller"]
        found["controller_to_last_flag_s"] = (
            max(v["flag"] for v in returned.values()) - stamps["controller"]
        )
        found["notice_sends_s"] = stamps["controller_end"] - stamps["controller"]
    return found


def run_case(case: str, where: Where, reps: int, log: IO[bytes]) -> dict[str, Any]:
    """``reps`` repetitions of one case, each on a fresh launcher."""
    entries = []
    for i in range(reps):
        entry = repetition(case, where, log)
        entries.append(entry)
        got = entry.get("error") or f"{entry['latency_s'] * 1e3:.1f} ms"
        print(f"  {case} {i + 1}/{reps}: {got}", file=sys.stderr, flush=True)
    return {"hosts": len(where.hosts), "workers": where.workers, "reps": entries}


# --- the report ---------------------------------------------------------------------------------


def ms(value: float) -> str:
    """Milliseconds, three significant figures at most."""
    return f"{value * 1e3:.3g} ms"


def spread(values: list[float]) -> str:
    """``median (min-max)``."""
    return f"{ms(statistics.median(values))} ({ms(min(values))}-{ms(max(values))})"


HOPS = (
    ("signal_to_handler_s", "signal -> launcher's handler"),
    ("signal_to_controller_s", "signal -> controller.preempt"),
    ("notice_sends_s", "notice sent to every agent"),
    ("controller_to_last_flag_s", "controller.preempt -> latest worker's listening thread"),
    ("controller_to_last_rank_s", "controller.preempt -> latest rank"),
    ("flag_to_seen_s", "listening thread -> the rank's loop (max)"),
    ("spread_s", "first rank -> latest rank"),
)


def summary(cases: dict[str, dict[str, Any]]) -> list[str]:
    """One Markdown row per case, then the hops' medians and what went wrong."""
    rows = [
        "| case | hosts x workers | signal to | latency: median (min-max) | target | reps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for case, info in cases.items():
        ok = [e for e in info["reps"] if "latency_s" in e]
        cell = spread([e["latency_s"] for e in ok]) if ok else "n/a"
        target = TARGETS_S[case.split("/")[0]]
        where = "the launcher's process" if "/launcher" in case else "an agent"
        shape, reps = f"{info['hosts']} x {info['workers']}", f"{len(ok)}/{len(info['reps'])}"
        rows.append(f"| {case} | {shape} | {where} | {cell} | <= {ms(target)} | {reps} |")
        parts = [f"{title} {spread(v)}" for key, title in HOPS if (v := values(ok, key))]
        if parts:
            notes.append(f"{case}: " + "; ".join(parts))
        notes += [f"{case}: {e['error']}" for e in info["reps"] if "error" in e]
        notes += [
            f"{case}: left running: {e['left_running']}" for e in info["reps"] if e["left_running"]
        ]
    return [*rows, "", *notes, "", COMPARISON]


def values(entries: list[dict[str, Any]], key: str) -> list[float]:
    """The values of ``key`` over the repetitions that have it."""
    return [e[key] for e in entries if key in e]


# --- main ---------------------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``."""
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.preempt_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=10, help="fresh launchers per case (10)")
    parser.add_argument("--hosts", type=int, default=3, help="test hosts of hosts/agent (3)")
    parser.add_argument(
        "--workers", type=counts, default=[1, 2], help="workers per test host, one case each (1,2)"
    )
    parser.add_argument("--skip-local", action="store_true", help="no local/* cases")
    parser.add_argument("--skip-hosts", action="store_true", help="no hosts/agent case")
    parser.add_argument(
        "--output", type=Path, default=HERE / "results-preempt-latency.json", help="JSON file"
    )
    parser.add_argument("--log", type=Path, help="the launchers' output (default: a temp file)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hostnames", help=argparse.SUPPRESS)
    parser.add_argument("--ssh-config", help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(opts: argparse.Namespace, log: IO[bytes]) -> dict[str, dict[str, Any]]:
    """Every case asked for; the cluster, if any, torn down whatever happens."""
    cases: dict[str, dict[str, Any]] = {}
    if not opts.skip_local:
        for case in ("local/launcher", "local/agent"):
            print(f"{case}: localhost x 2 ...", file=sys.stderr, flush=True)
            cases[case] = run_case(case, Where(["localhost"], 2), opts.reps, log)
    if not opts.skip_hosts:
        from testbed.cluster import Cluster  # noqa: PLC0415 -- needs root and cryptography

        with Cluster.up(opts.hosts) as cluster:
            for workers in opts.workers:
                case = f"hosts/agent ({opts.hosts} x {workers})"
                print(f"{case}: test hosts ...", file=sys.stderr, flush=True)
                where = Where(cluster.hostnames, workers, cluster)
                cases[case] = run_case(case, where, opts.reps, log)
    return cases


def main() -> None:
    """The driver (or, with ``--child``, one repetition's launcher)."""
    opts = parse_args()
    if opts.child:
        child(opts)
        return
    # a SIGTERM unwinds like an exception: the launcher processes and the cluster are undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as stack:
        if opts.log is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        else:
            log = stack.enter_context(opts.log.open("wb"))
        cases = measure(opts, log)
    options = {k: vars(opts)[k] for k in ("reps", "hosts", "workers")}
    opts.output.write_text(json.dumps({"cases": cases, "options": options}, indent=1))
    print("\n".join(summary(cases)))


if __name__ == "__main__":
    main()
