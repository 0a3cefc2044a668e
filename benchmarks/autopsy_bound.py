"""From a rank's raise to the exception in the caller, autopsy included: does the 2 s bound hold?

``python -m benchmarks.autopsy_bound [--reps N] [--partition-reps N] [--cases a,b]``, as root,
from the repository root.

When a run fails, each agent asks its live workers for their stacks before it tears them down
(:func:`torchrunx.stacks.collect`: 1 s for a dump to start, then 0.25 s for the last collective),
and the exception reaches the caller once every host has cleared the run. The bound checked
here is 2 s from the raise to the caller. 3 test hosts of ``testbed/cluster.py`` x 2 gloo
workers (``node1``: ranks 0, 1; ``node2``: 2, 3; ``node3``: 4, 5). Each rank says with a file
that it is in the function (a rank's status is ``running`` before its process group is made,
so :func:`benchmarks.ranks.wait_running` alone is not enough). Rank 2 then waits for a file that
this process writes 0.3 s after every rank is in (and once the case's fault is in place),
writes ``time.time()`` to a file and raises ``ValueError``. The other ranks, per case:

* ``collective``: in ``dist.barrier()``;
* ``python_loop``: a busy loop in Python;
* ``c_holds_gil``: a C call that holds the GIL (``pthread_mutex_timedlock`` through
  ``ctypes.PyDLL`` on a mutex the thread holds already: signals do not end it);
* ``sleep``: ``time.sleep``;
* ``stopped``: in ``dist.barrier()``, and rank 4 (``node3``) SIGSTOPped by this process just
  before the raise: it cannot answer;
* ``partition``: in ``dist.barrier()``, and ``node3`` cut off (``Cluster.partition``) just before
  the raise;
* ``partition_raiser``: the same, but the raiser's own host, ``node2``, is cut off.

The first five run ``--reps`` times on one launcher (warmed by a noop run); the partition cases
``--partition-reps`` times, each on a fresh launcher (a lost agent's host is healed and cleaned
between them). A repetition's latency is the time ``RunHandle.result()`` raised minus rank 2's
stamp (the hosts share this machine's clock); nothing is subtracted. The launcher's controller
is watched for where the time goes: when it took the first failure, each host's autopsy, each
host's clearing and an agent's loss. The report is checked: every rank but the raiser must be
in it with its stack (in the function that case puts it in), named as not answering, or among
the failed ranks (its own error, or its host lost); a rank in none of them is missing.

Every wait is bounded; the cluster goes down whatever happens (also on SIGTERM), and what still
runs on the hosts after a launcher is closed is reported and killed. Prints a Markdown table
(median, max, runs within the bound, runs whose exception accounts for every rank) and writes
``--output`` (JSON: every repetition, with its timeline, report and stacks; this machine's
paths replaced by ``<repo>``, ``<python>``, ``<tmp>``, ``<home>``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torchrunx
from benchmarks.ranks import wait_running

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from testbed.cluster import Cluster

HERE = Path(__file__).resolve().parent
HOSTS = 3
WORKERS = 2
RANKS = HOSTS * WORKERS
RAISER = 2  # node2[0]
STOPPED = 4  # node3[0], in the stopped case
BOUND_S = 2.0
HOLD_S = 60.0  # how long a rank stays in its state if nothing ends the run
WORKER_TIMEOUT_S = 90  # the barrier's: longer than any wait here
RUNNING_TIMEOUT_S = 60.0  # from submitting a run to every rank in it
SETTLE_S = 0.3  # from every rank in the run to the raise: each is in its state by then
RESULT_TIMEOUT_S = 60.0  # from the raise to the exception (a partition's is about 10 s)
LEFTOVER_GRACE_S = 5.0
ENTERED = "in"  # in.RANK: that rank is in the function
GO = "go"  # written by this process: rank 2 raises
RAISED = "raised"  # rank 2's time.time() as it raised
RANK_SPANS = re.compile(r"^\s+ranks? ([\d, -]+):")  # a line of the report of where ranks were
FAILED_RANK = re.compile(r"\brank (\d+) \(local rank")  # a failure's line
AGENT_HOST = re.compile(r"\bthe agent on node(\d+)\b")
PID = re.compile(r" \(pid \d+\)")


# --- in the workers -----------------------------------------------------------------------------


def noop() -> None:
    """The warm-up run."""


def wait_in_barrier() -> None:
    """In a collective until the run is torn down (or the barrier times out)."""
    import torch.distributed as dist  # noqa: PLC0415 -- in the workers only

    dist.barrier()


def spin_in_python() -> int:
    """A busy loop in Python."""
    count = 0
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        count += 1
    return count


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def hold_in_c() -> int:
    """Blocked in C with the GIL held: a mutex locked twice by this thread (until a timeout).

    ``ctypes.PyDLL`` keeps the GIL for the call; a futex wait resumes after a signal handler,
    so the stack signal does not end it either.
    """
    libc = ctypes.PyDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER (glibc)
    libc.pthread_mutex_lock(mutex)
    until = time.time() + HOLD_S
    timeout = _Timespec(int(until), int(until % 1 * 1e9))
    code: int = libc.pthread_mutex_timedlock(mutex, ctypes.byref(timeout))
    return code


def sleep_in_python() -> None:
    """``time.sleep``: in C, the GIL released."""
    time.sleep(HOLD_S)


BEHAVIOURS: dict[str, Callable[[], Any]] = {
    "collective": wait_in_barrier,
    "python_loop": spin_in_python,
    "c_holds_gil": hold_in_c,
    "sleep": sleep_in_python,
    "stopped": wait_in_barrier,
    "partition": wait_in_barrier,
    "partition_raiser": wait_in_barrier,
}


def one_raises(case: str, folder: str) -> None:
    """Rank 2 raises once told to; the others go where ``case`` puts them.

    Each rank first says it is in the function (a file ``in.RANK``): a rank's status is
    ``running`` from its connection to the agent on, before its process group is made.
    """
    rank = int(os.environ["RANK"])
    (Path(folder) / f"{ENTERED}.{rank}").touch()
    if rank != RAISER:
        BEHAVIOURS[case]()
        return
    go = Path(folder) / GO
    deadline = time.monotonic() + HOLD_S
    while not go.exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)
    raised = time.time()
    write_json(Path(folder) / RAISED, raised)
    msg = f"rank {RAISER} raised at {raised!r}"
    raise ValueError(msg)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` as JSON, atomically."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What the other ranks do, and the fault put in place just before the raise."""

    name: str
    others: str  # for the table
    where: str  # the function the other ranks' stacks must show
    stop: int | None = None  # a rank SIGSTOPped
    partition: int | None = None  # a node index cut off

    @property
    def lost(self) -> set[int]:
        """The ranks of the partitioned host (none if no partition)."""
        if self.partition is None:
            return set()
        return set(range(self.partition * WORKERS, (self.partition + 1) * WORKERS))


CASES = (
    Case("collective", "in dist.barrier()", "wait_in_barrier"),
    Case("python_loop", "busy loop in Python", "spin_in_python"),
    Case("c_holds_gil", "C call holding the GIL", "hold_in_c"),
    Case("sleep", "time.sleep", "sleep_in_python"),
    Case("stopped", f"barrier; rank {STOPPED} SIGSTOPped", "wait_in_barrier", stop=STOPPED),
    Case("partition", "barrier; node3 cut off", "wait_in_barrier", partition=2),
    Case(
        "partition_raiser", "barrier; node2 (the raiser's) cut off", "wait_in_barrier", partition=1
    ),
)


# --- the launcher's side: where the time goes ---------------------------------------------------


class Timeline:
    """What the controller thread did for the run in flight, with ``time.time()``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def note(self, what: str, **fields: Any) -> None:
        """One event (called on the controller thread)."""
        self.events.append({"what": what, "t": time.time(), **fields})

    def install(self) -> None:
        """Wrap the controller's and the run state's hooks (this process only)."""
        from torchrunx.controller import Controller  # noqa: PLC0415
        from torchrunx.run_state import RunState  # noqa: PLC0415

        on_outcome, on_stacks = Controller._on_outcome, RunState._on_stacks  # noqa: SLF001
        cleared, fail_agent = Controller._cleared, Controller.fail_agent  # noqa: SLF001

        def outcome(
            controller: Controller, run: Any, agent: Any, message: Any, frames: Any
        ) -> None:
            if type(message).__name__ != "Result":
                self.note("failure", host=agent.hostname, kind=type(message).__name__)
            on_outcome(controller, run, agent, message, frames)

        def stacks(state: RunState, agent: Any, message: Any) -> None:
            if message.request is None:
                ranks = sorted(s.rank for s in message.ranks)
                self.note("autopsy", host=agent.hostname, ranks=ranks, silent=list(message.silent))
            on_stacks(state, agent, message)

        def clear(controller: Controller, run: RunState, index: int) -> None:
            self.note("cleared", host=run.agents[index].hostname)
            cleared(controller, run, index)

        def lose(controller: Controller, agent: Any, reason: str) -> None:
            if agent.failure is None:
                self.note("agent_lost", host=agent.hostname, reason=reason)
            fail_agent(controller, agent, reason)

        Controller._on_outcome = outcome  # type: ignore[method-assign,assignment]  # noqa: SLF001
        RunState._on_stacks = stacks  # type: ignore[method-assign,assignment]  # noqa: SLF001
        Controller._cleared = clear  # type: ignore[method-assign,assignment]  # noqa: SLF001
        Controller.fail_agent = lose  # type: ignore[method-assign,assignment]

    def since(self, raised: float) -> list[dict[str, Any]]:
        """The events, each with its time after the raise (``after_s``)."""
        return [{**e, "after_s": e["t"] - raised} for e in self.events]


TIMELINE = Timeline()


# --- the driver ---------------------------------------------------------------------------------


def launcher_on(cluster: Cluster, log_dir: str = "") -> torchrunx.Launcher:
    """3 hosts x 2 gloo workers, default bounds but the barrier's timeout."""
    return torchrunx.Launcher(
        hostnames=cluster.hostnames, workers_per_host=WORKERS, backend="gloo",
        ssh_config_file=cluster.ssh_config, log_dir=log_dir, worker_timeout=WORKER_TIMEOUT_S,
    )  # fmt: skip


def repetition(
    launcher: torchrunx.Launcher, cluster: Cluster, case: Case, folder: Path
) -> dict[str, Any]:
    """One run: the fault, the raise, the exception; the latency, timeline and report."""
    here = importlib.import_module("benchmarks.autopsy_bound")
    folder.mkdir()
    TIMELINE.events.clear()
    handle = launcher.submit(here.one_raises, case.name, str(folder))
    try:
        caught, error, pids = raise_in(handle, cluster, case, folder)
    finally:
        if not handle.done():  # this repetition went wrong: its run goes
            handle.cancel()
    stamp = folder / RAISED
    if not stamp.exists():
        msg = f"no stamp from rank {RAISER}; the run raised {type(error).__name__}: {error}"
        raise RuntimeError(msg)
    raised = json.loads(stamp.read_text())
    entry = {"latency_s": caught - raised, "within_bound": caught - raised <= BOUND_S}
    entry["timeline"] = TIMELINE.since(raised)
    entry.update(report_of(error, case))
    if case.stop is not None:
        pid = pids.get(case.stop)
        entry["stopped_pid_gone"] = pid is not None and not Path(f"/proc/{pid}").exists()
    return entry


def raise_in(
    handle: Any, cluster: Cluster, case: Case, folder: Path
) -> tuple[float, BaseException, dict[int, int | None]]:
    """Every rank in, the fault, the go: when the exception came, what it was, the ranks' pids."""
    wait_running(handle, RANKS, RUNNING_TIMEOUT_S)
    wait_entered(handle, folder)
    pids = {r: s.pid for r, s in handle.status(timeout=2).items()}
    time.sleep(SETTLE_S)
    stopped = pids.get(case.stop) if case.stop is not None else None
    if stopped:
        os.kill(stopped, signal.SIGSTOP)
    if case.partition is not None:
        cluster.partition(case.partition)
    (folder / GO).touch()
    try:
        handle.result(timeout=RESULT_TIMEOUT_S)
    except TimeoutError:
        raise
    except Exception as e:  # noqa: BLE001 -- the exception is what is measured
        return time.time(), e, pids
    msg = f"the run returned: rank {RAISER} was to raise"
    raise RuntimeError(msg)


def wait_entered(handle: Any, folder: Path) -> None:
    """Until every rank has said it is in the function (past its process group), or raise."""
    deadline = time.monotonic() + RUNNING_TIMEOUT_S
    while not all((folder / f"{ENTERED}.{r}").exists() for r in range(RANKS)):
        if handle.done():
            handle.result()  # raises what ended it
        if time.monotonic() > deadline:
            missing = [r for r in range(RANKS) if not (folder / f"{ENTERED}.{r}").exists()]
            msg = f"ranks {missing} not in the function after {RUNNING_TIMEOUT_S:g} s"
            raise TimeoutError(msg)
        time.sleep(0.01)


def report_of(error: BaseException, case: Case) -> dict[str, Any]:
    """What the exception says of each rank but the raiser, and whether none is missing."""
    from torchrunx.outcome import SILENT  # noqa: PLC0415

    stacks: dict[int, str] = getattr(error, "stacks", {})
    failures: dict[int, BaseException] = getattr(error, "failures", {})
    notes = list(getattr(error, "__notes__", []))
    named = sorted(named_ranks(str(error), notes))
    ranks: dict[str, str] = {}
    for rank in range(RANKS):
        if rank == RAISER:
            continue
        text = stacks.get(rank)
        if text == SILENT:
            ranks[str(rank)] = "did not answer"
        elif text is not None and case.where in text:
            ranks[str(rank)] = "stack"
        elif rank in failures:  # it raised too (a peer's teardown broke its collective)
            lost = isinstance(failures[rank], torchrunx.AgentFailedError)
            ranks[str(rank)] = "host lost" if lost else f"raised {type(failures[rank]).__name__}"
        elif text is not None:
            ranks[str(rank)] = "stack elsewhere"
        else:
            ranks[str(rank)] = "missing"
    silent_ok = all(
        ranks[str(r)] == "did not answer" for r in ([case.stop] if case.stop is not None else [])
    )
    unnamed = [r for r in range(RANKS) if r != RAISER and r not in named]
    return {
        "raised": type(error).__name__,
        "message": str(error).splitlines()[0] if str(error) else "",
        "text": str(error)[:4000],
        "ranks": ranks,
        "complete": "missing" not in ranks.values() and silent_ok and not unnamed,
        "named": named,
        "unnamed": unnamed,
        "notes": notes,
        "stacks": {str(r): text for r, text in stacks.items()},
    }


def named_ranks(message: str, notes: list[str]) -> set[int]:
    """The ranks the exception's text accounts for.

    Those of its report of where the ranks were, those its failure lines name (``rank N (local
    rank``), and those of a host whose agent it names (``the agent on nodeK``).
    """
    found: set[int] = set()
    for note in notes:
        if note.startswith("where the ranks"):
            found.update(r for line in note.splitlines()[1:] for r in spans(line))
    text = "\n".join([message, *notes])
    found.update(int(m) for m in FAILED_RANK.findall(text))
    for host in AGENT_HOST.findall(text):
        found.update(range((int(host) - 1) * WORKERS, int(host) * WORKERS))
    return found


def spans(line: str) -> list[int]:
    """The ranks a report line starts with: ``  ranks 0, 4-5: ...`` -> ``[0, 4, 5]``."""
    match = RANK_SPANS.match(line)
    if match is None:
        return []
    found: list[int] = []
    for part in match[1].split(","):
        low, _, high = part.strip().partition("-")
        found += range(int(low), int(high or low) + 1)
    return found


def run_case(
    launcher: torchrunx.Launcher, cluster: Cluster, case: Case, reps: int, scratch: Path
) -> list[dict[str, Any]]:
    """``reps`` repetitions of ``case`` on one warm launcher."""
    entries = []
    for i in range(reps):
        try:
            entry = repetition(launcher, cluster, case, scratch / f"{case.name}-{i}")
        except Exception as e:  # noqa: BLE001 -- this repetition's error, in the report
            entry = {"error": f"{type(e).__name__}: {e}"}
        entries.append(entry)
        print(f"  {case.name} {i + 1}/{reps}: {outcome(entry)}", file=sys.stderr, flush=True)
    return entries


def run_partitioned(
    cluster: Cluster, case: Case, reps: int, scratch: Path, log_dir: str
) -> list[dict[str, Any]]:
    """``reps`` repetitions of a partition case, each on a fresh launcher; the host healed."""
    here = importlib.import_module("benchmarks.autopsy_bound")
    entries = []
    for i in range(reps):
        entry: dict[str, Any] = {}
        try:
            with launcher_on(cluster, log_dir) as launcher:
                launcher.run(here.noop)
                entry = repetition(launcher, cluster, case, scratch / f"{case.name}-{i}")
                if case.partition is not None:
                    cluster.heal(case.partition)
        except Exception as e:  # noqa: BLE001 -- this repetition's error, in the report
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            entry["left_running"] = cluster.reset(wait=LEFTOVER_GRACE_S)
        entries.append(entry)
        print(f"  {case.name} {i + 1}/{reps}: {outcome(entry)}", file=sys.stderr, flush=True)
    return entries


def outcome(entry: dict[str, Any]) -> str:
    """One repetition in a few words."""
    if "error" in entry:
        return str(entry["error"])
    ranks = ", ".join(f"{r}: {s}" for r, s in entry["ranks"].items())
    return f"{ms(entry['latency_s'])}, {entry['raised']}; {ranks}"


def measure(opts: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Every case asked for, on one cluster torn down whatever happens; what was left running."""
    from testbed.cluster import Cluster  # noqa: PLC0415 -- needs root and cryptography

    here = importlib.import_module("benchmarks.autopsy_bound")
    TIMELINE.install()
    chosen = [c for c in CASES if c.name in opts.cases]
    found: dict[str, Any] = {}
    leftovers: dict[str, list[str]] = {}
    with Cluster.up(HOSTS) as cluster:
        warm = [c for c in chosen if c.partition is None]
        if warm:
            with launcher_on(cluster, opts.log_dir) as launcher:
                launcher.run(here.noop)
                for case in warm:
                    print(f"{case.name}: {case.others} ...", file=sys.stderr, flush=True)
                    found[case.name] = {
                        "reps": run_case(launcher, cluster, case, opts.reps, scratch)
                    }
            left = cluster.wait_no_processes(timeout=LEFTOVER_GRACE_S)
            leftovers["after the first launcher"] = left + cluster.reset()
        for case in (c for c in chosen if c.partition is not None):
            print(f"{case.name}: {case.others} ...", file=sys.stderr, flush=True)
            reps = run_partitioned(cluster, case, opts.partition_reps, scratch, opts.log_dir)
            found[case.name] = {"reps": reps}
    for case in chosen:
        found[case.name]["others"] = case.others
    return {"cases": found, "left_running": leftovers}


# --- the report ---------------------------------------------------------------------------------


def ms(value: float) -> str:
    """Milliseconds below one second (three significant figures), else seconds."""
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def hop(entry: dict[str, Any], what: str, last: bool = False) -> float | None:
    """The first (or last) event ``what`` of a repetition, in seconds after the raise."""
    times: list[float] = [e["after_s"] for e in entry["timeline"] if e["what"] == what]
    if not times:
        return None
    return max(times) if last else min(times)


HOPS = (
    ("failure", False, "raise -> first rank's failure at the launcher"),
    ("agent_lost", False, "raise -> an agent declared lost"),
    ("autopsy", True, "raise -> last host's autopsy in"),
    ("cleared", True, "raise -> last host cleared"),
)


def summary(measured: dict[str, Any]) -> list[str]:
    """A Markdown table against the bound, then where the time went and what went wrong."""
    header = f"median | max | within {BOUND_S:g} s | every rank accounted for | raised"
    rows = [f"| case | other ranks | {header} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    found = measured["cases"]
    for case in CASES:
        if case.name not in found:
            continue
        reps = found[case.name]["reps"]
        ok = [e for e in reps if "latency_s" in e]
        if ok:
            latencies = [e["latency_s"] for e in ok]
            cells = [ms(statistics.median(latencies)), ms(max(latencies))]
            cells.append(f"{sum(e['within_bound'] for e in ok)}/{len(reps)}")
            cells.append(f"{sum(e['complete'] for e in ok)}/{len(reps)}")
            cells.append(", ".join(sorted({e["raised"] for e in ok})))
        else:
            cells = ["n/a", "n/a", f"0/{len(reps)}", f"0/{len(reps)}", ""]
        rows.append(f"| {case.name} | {case.others} | {' | '.join(cells)} |")
        parts = []
        for what, last, title in HOPS:
            values = [v for e in ok if (v := hop(e, what, last)) is not None]
            if values:
                parts.append(f"{title} {ms(statistics.median(values))}")
        if parts:
            notes.append(f"{case.name} (medians): " + "; ".join(parts))
        states = sorted({f"{r}: {s}" for e in ok for r, s in e["ranks"].items()})
        notes.append(f"{case.name}: ranks as reported: {', '.join(states)}")
        lost = sorted(
            {
                PID.sub("", e["reason"].splitlines()[0])
                for r in ok
                for e in r["timeline"]
                if "reason" in e
            }
        )
        if lost:
            notes.append(f"{case.name}: agents lost: {' / '.join(lost)}")
        unnamed = sorted({r for e in ok for r in e["unnamed"]})
        if unnamed:
            notes.append(f"{case.name}: ranks the exception's text does not name: {unnamed}")
        notes += [f"{case.name}: {e['error']}" for e in reps if "error" in e]
        notes += [
            f"{case.name}: left running: {e['left_running']}" for e in reps if e.get("left_running")
        ]
    notes += [
        f"left running {when}: {left}" for when, left in measured["left_running"].items() if left
    ]
    return [*rows, "", *notes]


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.autopsy_bound",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=7, help="repetitions per case (7)")
    parser.add_argument(
        "--partition-reps", type=int, default=5, help="repetitions per partition case (5)"
    )
    names = [c.name for c in CASES]
    parser.add_argument(
        "--cases",
        type=lambda text: [n for n in text.split(",") if n],
        default=names,
        help=f"which cases, comma-separated (all: {','.join(names)})",
    )
    parser.add_argument(
        "--log-dir", default="", help="the launchers' log_dir (default: no log files)"
    )
    parser.add_argument(
        "--output", type=Path, default=HERE / "results-autopsy-bound.json", help="JSON file"
    )
    opts = parser.parse_args()
    unknown = sorted(set(opts.cases) - set(names))
    if unknown:
        parser.error(f"unknown cases {unknown}: choose among {names}")
    return opts


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder the hosts see too (they share this machine's filesystem)."""
    with tempfile.TemporaryDirectory(prefix="autopsy-bound-") as folder:
        yield Path(folder)


def without_paths(text: str, scratch: Path) -> str:
    """``text`` with this machine's folders (stacks, tracebacks) replaced by placeholders."""
    places = {
        str(scratch): "<tmp>",
        str(HERE.parent): "<repo>",
        sys.base_prefix: "<python>",
        tempfile.gettempdir(): "<tmp>",
        str(Path.home()): "<home>",
    }
    for path in sorted(places, key=len, reverse=True):
        text = text.replace(path, places[path])
    return text


def main() -> None:
    """The driver."""
    opts = parse_args()
    # a SIGTERM unwinds like an exception: the launchers and the cluster are undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    with scratch_folder() as scratch:
        found = measure(opts, scratch)
    options = {k: vars(opts)[k] for k in ("reps", "partition_reps", "cases")}
    machine = {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    lines = summary(found)
    result = {
        "bound_s": BOUND_S,
        **found,
        "options": options,
        "machine": machine,
        "wall_s": time.monotonic() - started,
        "table": lines,
    }
    opts.output.write_text(without_paths(json.dumps(result, indent=1), scratch))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
