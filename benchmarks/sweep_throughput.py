"""Throughput of ``Launcher.sweep``: short runs on 2 slots, beside a loop of ``run()`` and torchrun.

``python -m benchmarks.sweep_throughput [--items N] [--reps R] [--torchrun-items N]``, from the
repository root (about a minute on 2 cores).

One host, CPU, 2 slots: ``Launcher(hostnames=["localhost"], workers_per_host=2, backend=None,
log_dir="")`` (``--backend gloo``: a gloo process group in every run, and in torchrun's workers).
Every run is one rank calling ``stamp(item)``, which records ``time.time()`` as it enters, sleeps
10 ms, records ``time.time()`` again and returns both, with the cores it may run on
(``os.sched_getaffinity(0)``) and ``$TORCHRUNX_RUN_ID``. The function is passed from
``__main__`` (this module, run with ``-m``), so it travels by value, as a script's function
does: the workers import nothing of the benchmark.

* **sweep**: ``launcher.sweep(stamp, range(N), workers=1, progress=False)`` (N: ``--items``,
  100), iterated to its end; every outcome is checked (the item's own stamp). Wall time: from
  just before ``sweep()`` to the last outcome out of the iterator; runs/s = N / that. The gap
  per slot: a sweep's run is pinned to its slot's cores (one core each, here), so the runs with
  the same cores ran on the same slot one after another; a gap is a run's entry minus the return
  of the run before it on its slot: what a slot spends between two functions (the result's way
  back, the teardown, the scheduling, the next run's start). Target: median <= 50 ms. Pooled over
  the repetitions: median, p90, max.
* **loop**: the same N items as ``launcher.view(workers_per_host=1).run(stamp, item)``, one
  after another (a sweep written as a for loop); wall time from just before the first ``run()``
  to the return of the last. Its gap: a run's entry minus the previous run's return.
* **torchrun**: ``python -m torch.distributed.run --standalone --nproc-per-node 1`` of this file
  (``--torchrun-worker``: the same stamp, written to a file; no process group unless
  ``--backend gloo``) with the item, as separate processes, 2 at a time (the next starts as one
  exits; exits are polled every 5 ms), for ``--torchrun-items`` items (10, not N: each takes
  seconds); wall time from starting the first to the exit of the last.

Each sweep and each loop is a fresh process (this module, ``--child``) with a fresh launcher,
started, that does one run (``view(workers_per_host=1).run(stamp, -1)``) before the timing: a
fresh launcher's first run is slow (it starts the agent, and the agent its forkserver), and that
warm-up is not counted (its time, from the ``Launcher`` to the run's return, is printed). The
repetitions (``--reps``, 3) interleave the three cases, in alternating order (sweep, loop,
torchrun; then torchrun, loop, sweep; ...).

Then, unless ``--no-trace``, one more sweep with ``TORCHRUNX_TRACE`` (a trace file per run: its
phases on the host, see ``torchrunx/trace.py``), not counted above (writing a trace lengthens
every run's end): each gap is cut into hops at the starts and ends of the two runs' phases, in
causal order (``PREV_HOPS``, ``NEXT_HOPS``; a trace's times are relative to its run's
submission, and are put on the wall clock by its function phase's start, which is the recorded
entry), and each hop's median and p90 are printed.

Every wait is bounded (``--timeout`` per process); whatever a repetition started that still runs
5 s after it is reported and killed. Prints a Markdown table (runs/s, median (min-max) over the
repetitions; the sweep's runs/s median over each case's; wall time; the gap's median, p90 and max,
the sweep's against the target) and the traced hops; writes ``--output`` (JSON: every run's
stamps, every repetition, the commit measured and whether ``torchrunx/`` differed from it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import driving, leftovers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SLOTS = 2  # workers_per_host: runs at once
SLEEP_S = 0.010  # the function's work
TARGET_S = 0.050  # the sweep's median gap per slot
LEFTOVER_GRACE_S = 5.0
POLL_S = 0.005  # how often torchrun's processes are looked at
WARM_UP_ITEM = -1
CASES = ("sweep", "loop", "torchrun")


# --- in the workers -----------------------------------------------------------------------------


def stamp(item: int) -> dict[str, Any]:
    """The function of every run: entry, 10 ms asleep, return; the cores; the run's id."""
    entered = time.time()
    time.sleep(SLEEP_S)
    returned = time.time()
    return {
        "item": item,
        "entered": entered,
        "returned": returned,
        "cores": sorted(os.sched_getaffinity(0)),
        "pid": os.getpid(),
        "run": os.environ.get("TORCHRUNX_RUN_ID", ""),
    }


def torchrun_worker(folder: str, item: int, backend: str) -> None:
    """The worker script of torchrun: (a process group,) the same stamp, written to ``folder``."""
    dist = None
    if backend != "none":
        import torch.distributed as dist  # noqa: PLC0415 -- only with a process group

        dist.init_process_group(backend=backend)
    write_json(Path(folder) / f"{item}.json", stamp(item))
    if dist is not None:
        dist.destroy_process_group()


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` as JSON, atomically."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """A stamp or report; None if it was never written."""
    return json.loads(path.read_text()) if path.exists() else None


# --- the launcher's process (--child) -----------------------------------------------------------


def child(opts: argparse.Namespace) -> None:
    """Ours: a fresh launcher, a warm-up run, then the sweep or the loop; a report in the folder."""
    folder = Path(opts.child)
    report: dict[str, Any] = {"case": opts.case}
    try:
        measure_ours(opts, report)
    except Exception as e:  # noqa: BLE001 -- reported to the driver, which prints it
        report["error"] = f"{type(e).__name__}: {e}"
    write_json(folder / "report.json", report)


def checked(item: int, outcome: Any) -> dict[str, Any]:
    """The stamp of ``item``'s run; its exception, or a wrong result, raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    got = outcome.rank(0)
    if got["item"] != item:
        msg = f"item {item}: the run returned the stamp of item {got['item']}"
        raise RuntimeError(msg)
    return dict(got)


def measure_ours(opts: argparse.Namespace, report: dict[str, Any]) -> None:
    """The warm-up, then the measured sweep or loop, with every run's stamps."""
    import torchrunx  # noqa: PLC0415 -- not in torchrun's workers

    made = time.time()
    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=SLOTS,
        backend=None if opts.backend == "none" else opts.backend, log_dir="",
    )  # fmt: skip
    with launcher:
        one = launcher.view(workers_per_host=1)
        checked(WARM_UP_ITEM, one.run(stamp, WARM_UP_ITEM))
        report["warm_up_s"] = time.time() - made  # start and first run
        items = list(range(opts.items))
        stamps: list[dict[str, Any]] = []
        begun = time.time()
        if opts.case == "sweep":
            sweep = launcher.sweep(stamp, items, workers=1, progress=False)
            for item, outcome in sweep:
                stamps.append({**checked(item, outcome), "seen": time.time()})
            report["most_in_flight"] = sweep.most_in_flight
        else:
            stamps += [
                {**checked(item, one.run(stamp, item)), "seen": time.time()} for item in items
            ]
        report["wall_s"] = time.time() - begun
        report["begun"] = begun
        report["runs"] = stamps


# --- the driver ---------------------------------------------------------------------------------


def start_process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` from the repository root, in a session of its own, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session ``proc`` leads (what it started there too), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ours_repetition(
    scratch: Path, opts: argparse.Namespace, case: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One launcher's process: its warm-up, then a sweep or a loop of ``--items`` runs."""
    folder = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=scratch))
    cmd = [sys.executable, "-m", "benchmarks.sweep_throughput", "--child", str(folder)]
    cmd += ["--case", case, "--items", str(opts.items), "--backend", opts.backend]
    started = time.time()
    proc = start_process(cmd, scratch / f"{case}.log", env)
    code: int | None = None
    try:
        code = proc.wait(opts.timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if code is None:  # timed out, or interrupted: its session goes (the rest: leftovers)
            kill_session(proc)
    entry: dict[str, Any] = {"exit_code": code, "process_s": time.time() - started}
    report = read_json(folder / "report.json")
    if report is None:
        why = "timed out" if code is None else f"exited ({code})"
        entry["error"] = f"the launcher's process {why} without a report"
    else:
        entry.update(report)
        if "error" not in report:
            entry["runs_per_s"] = opts.items / report["wall_s"]
            entry["gaps_s"] = slot_gaps(report["runs"]) if case == "sweep" else loop_gaps(report)
    entry["left_running"] = leftovers(LEFTOVER_GRACE_S)
    return entry


def slot_gaps(runs: list[dict[str, Any]]) -> list[float]:
    """Per slot (the cores a run was pinned to), each run's entry minus its predecessor's return."""
    return [nxt["entered"] - prev["returned"] for prev, nxt in slot_pairs(runs)]


def slot_pairs(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The pairs of runs one after the other on one slot."""
    by_slot: dict[tuple[int, ...], list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        by_slot[tuple(run["cores"])].append(run)
    pairs = []
    for slot in by_slot.values():
        slot.sort(key=lambda r: r["entered"])
        pairs += list(itertools.pairwise(slot))
    return pairs


def loop_gaps(report: dict[str, Any]) -> list[float]:
    """Each run's entry minus the previous run's return (one run at a time)."""
    runs = report["runs"]
    return [nxt["entered"] - prev["returned"] for prev, nxt in itertools.pairwise(runs)]


def torchrun_repetition(scratch: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """``--torchrun-items`` torchruns of one item each, ``SLOTS`` at a time."""
    folder = Path(tempfile.mkdtemp(prefix="torchrun-", dir=scratch))
    # as a module, from the repository root: the worker imports benchmarks.processes
    script = ["-m", "benchmarks.sweep_throughput", "--backend", opts.backend]
    script += ["--torchrun-worker", str(folder)]
    queued = collections.deque(range(opts.torchrun_items))
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    exits: dict[int, dict[str, Any]] = {}
    begun = time.time()
    try:
        while queued or running:
            while queued and len(running) < SLOTS:
                item = queued.popleft()
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                cmd += ["--nproc-per-node", "1", *script, str(item)]
                running[item] = (start_process(cmd, scratch / "torchrun.log"), time.time())
            time.sleep(POLL_S)
            for item, (proc, started) in list(running.items()):
                code = proc.poll()
                if code is None and time.time() - started < opts.timeout:
                    continue
                if code is None:
                    kill_session(proc)
                exits[item] = {"exit_code": code, "process_s": time.time() - started}
                del running[item]
    finally:
        for proc, _ in running.values():  # interrupted: what still runs goes
            kill_session(proc)
    entry: dict[str, Any] = {"wall_s": time.time() - begun, "begun": begun, "exits": exits}
    stamps = [read_json(folder / f"{item}.json") for item in range(opts.torchrun_items)]
    failed = [i for i, e in sorted(exits.items()) if e["exit_code"] != 0 or stamps[i] is None]
    if failed:
        entry["error"] = f"items {failed}: " + ", ".join(
            f"exit {exits[i]['exit_code']}" for i in failed
        )
    else:
        entry["runs"] = stamps
        entry["runs_per_s"] = opts.torchrun_items / entry["wall_s"]
    entry["left_running"] = leftovers(LEFTOVER_GRACE_S)
    return entry


def measure(opts: argparse.Namespace, scratch: Path) -> dict[str, list[dict[str, Any]]]:
    """``--reps`` of the three cases, interleaved, in alternating order."""
    reps: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for i in range(opts.reps):
        order = CASES if i % 2 == 0 else CASES[::-1]
        for case in order:
            if case == "torchrun":
                entry = torchrun_repetition(scratch, opts)
            else:
                entry = ours_repetition(scratch, opts, case)
            reps[case].append(entry)
            got = entry.get("error") or f"{entry['runs_per_s']:.1f} runs/s"
            print(f"  {i + 1}/{opts.reps} {case}: {got}", file=sys.stderr, flush=True)
    return reps


def traced_sweep(opts: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One more sweep with ``TORCHRUNX_TRACE``: its gaps cut into hops at its runs' phases."""
    traces = scratch / "traces"
    env = {**os.environ, "TORCHRUNX_TRACE": str(traces)}
    entry = ours_repetition(scratch, opts, "sweep", env)
    if "error" in entry:
        return entry
    phases = {path.stem: read_trace(path) for path in traces.glob("*.json")}
    hops: dict[str, list[float]] = collections.defaultdict(list)
    untraced = 0
    for prev, nxt in slot_pairs(entry["runs"]):
        if prev["run"] not in phases or nxt["run"] not in phases:
            untraced += 1
            continue
        marks = gap_marks(prev, phases[prev["run"]]) + gap_marks(nxt, phases[nxt["run"]], nxt=True)
        for (_, before), (name, after) in itertools.pairwise(marks):
            hops[name].append(after - before)
    entry["hops_s"] = dict(hops)
    entry["untraced_pairs"] = untraced
    print(f"  traced sweep: {entry['runs_per_s']:.1f} runs/s", file=sys.stderr, flush=True)
    return entry


def read_trace(path: Path) -> dict[str, tuple[float, float]]:
    """A one-rank run's trace: each phase's (start, end), in seconds from the run's submission."""
    spans = {}
    for event in json.loads(path.read_text())["traceEvents"]:
        if event["ph"] == "X":
            begin = event["ts"] / 1e6
            spans[event["name"]] = (begin, begin + event["dur"] / 1e6)
    return spans


# the bounds of a gap's hops, in causal order, each (phase, 0 at its start or 1 at its end, the hop
# that ends there); a hop of a phase missing from a trace (no process group) is left out
PREV_HOPS = (
    ("pickle", 1, "function return -> result pickled (worker)"),
    ("to the launcher", 1, "-> result received by the launcher"),
    ("teardown", 0, "-> the worker's exit seen by the agent"),
    ("teardown", 1, "-> the run cleared on the host (agent)"),
    ("run", 1, "-> the run concluded by the launcher (its trace written)"),
)
NEXT_HOPS = (
    ("run", 0, "-> the next run's Run.start (result resolved, done-callback, scheduler, submit)"),
    ("fork", 0, "-> its fork sent to the forkserver (agent)"),
    ("start", 0, "-> its worker forked (first line of the child)"),
    ("start", 1, "-> worker set up (env, cores pinned, connected to the agent)"),
    ("rendezvous", 1, "-> rendezvous"),
    ("unpickle", 1, "-> function unpickled"),
    ("process group", 1, "-> process group made"),
)
NEXT_ENTRY = "-> function entered"


def gap_marks(
    run: dict[str, Any], spans: dict[str, tuple[float, float]], *, nxt: bool = False
) -> list[tuple[str, float]]:
    """The wall-clock times of a gap's bounds in ``run``: at its end, or (``nxt``) at its start."""
    zero = run["entered"] - spans["function"][0]  # the trace's times on the wall clock
    if not nxt:
        marks = [("", run["returned"])]
        return marks + [(hop, zero + spans[p][i]) for p, i, hop in PREV_HOPS if p in spans]
    marks = [(hop, zero + spans[p][i]) for p, i, hop in NEXT_HOPS if p in spans]
    return [*marks, (NEXT_ENTRY, run["entered"])]


# --- the report ---------------------------------------------------------------------------------


def ms(value: float) -> str:
    """Milliseconds below one second (three significant figures), else seconds."""
    return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"


def p90(values: list[float]) -> float:
    """The 90th percentile of ``values`` (interpolated between the nearest ranks)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def spread(values: list[float], unit: str = "") -> str:
    """``median (min-max)``, as numbers with ``unit``, or as times without one."""
    if not unit:
        return f"{ms(statistics.median(values))} ({ms(min(values))}-{ms(max(values))})"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.3g} ({low:.3g}-{high:.3g}) {unit}"


TITLES = {
    "sweep": f"sweep, {SLOTS} slots",
    "loop": "loop of view(workers_per_host=1).run()",
    "torchrun": f"torchrun --nproc-per-node 1, {SLOTS} at a time",
}


def summary(
    reps: dict[str, list[dict[str, Any]]], traced: dict[str, Any] | None, opts: argparse.Namespace
) -> list[str]:
    """A Markdown table, the target, the warm-ups, the traced hops, and what went wrong."""
    columns = ["case", "items per rep", "runs/s: median (min-max)", "sweep / this (runs/s)"]
    columns += ["wall: median (min-max)", "gap: median / p90 / max", "target", "reps"]
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    good = {case: [e for e in reps[case] if "runs_per_s" in e] for case in CASES}
    rates = {c: statistics.median([e["runs_per_s"] for e in g]) for c, g in good.items() if g}
    rows += [table_row(case, good[case], len(reps[case]), rates, opts) for case in CASES]
    notes = []
    for case in ("sweep", "loop"):
        warm = [e["warm_up_s"] for e in reps[case] if "warm_up_s" in e]
        if warm:
            what = "launcher start and its first run, untimed"
            notes.append(f"{case}: warm-up ({what}) {spread(warm)}")
    flights = sorted({e["most_in_flight"] for e in good["sweep"]})
    if flights:
        notes.append(f"sweep: most runs in flight {flights}")
    notes.append(
        "gap: sweep, per slot, a run's entry minus the return of the run before it on its slot; "
        "loop, a run's entry minus the previous run's return; pooled over the repetitions"
    )
    if traced is not None:
        notes += traced_lines(traced)
    for case, entries in reps.items():
        for i, e in enumerate(entries):
            if "error" in e:
                notes.append(f"{case} rep {i + 1}: {e['error']}")
            if e["left_running"]:
                notes.append(f"{case} rep {i + 1}: left running (killed): {e['left_running']}")
    return [*rows, "", *notes]


def table_row(
    case: str,
    good: list[dict[str, Any]],
    reps: int,
    rates: dict[str, float],
    opts: argparse.Namespace,
) -> str:
    """One case's row: runs/s, the sweep's ratio to it, wall time, the gap and its target."""
    items = opts.torchrun_items if case == "torchrun" else opts.items
    if not good:
        return f"| {TITLES[case]} | {items} | error | | | | | 0 of {reps} |"
    rate = spread([e["runs_per_s"] for e in good], "runs/s")
    ratio = f"{rates['sweep'] / rates[case]:.1f}x" if "sweep" in rates else ""
    wall = spread([e["wall_s"] for e in good])
    gap = target = ""
    if case != "torchrun":
        pooled = [g for e in good for g in e["gaps_s"]]
        mid = statistics.median(pooled)
        gap = f"{ms(mid)} / {ms(p90(pooled))} / {ms(max(pooled))} ({len(pooled)} gaps)"
    if case == "sweep":
        target = f"median <= {ms(TARGET_S)}: " + ("met" if mid <= TARGET_S else "MISSED")
    cells = [TITLES[case], str(items), rate, ratio, wall, gap, target, f"{len(good)} of {reps}"]
    return "| " + " | ".join(cells) + " |"


def traced_lines(traced: dict[str, Any]) -> list[str]:
    """The traced sweep's gap, hop by hop (medians)."""
    if "error" in traced:
        return ["", f"traced sweep: {traced['error']}"]
    gaps = traced["gaps_s"]
    head = f"traced sweep (TORCHRUNX_TRACE; not in the figures above): {traced['runs_per_s']:.1f}"
    head += f" runs/s, gap per slot median {ms(statistics.median(gaps))}, p90 {ms(p90(gaps))};"
    lines = ["", f"{head} its hops, median (p90) over the {len(gaps)} gaps:"]
    total = 0.0
    for name, values in traced["hops_s"].items():
        total += statistics.median(values)
        lines.append(f"  {name}: {ms(statistics.median(values))} ({ms(p90(values))})")
    lines.append(f"  (sum of the hops' medians: {ms(total)})")
    if traced["untraced_pairs"]:
        lines.append(f"  {traced['untraced_pairs']} gaps without a trace file left out")
    return lines


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the package's files differ from it."""

    def git(*args: str) -> str:
        cmd = ["git", *args]
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "package_dirty": bool(git("status", "--porcelain", "--", "torchrunx")),
    }


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=100, help="runs per sweep and loop (100)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each case (3)")
    parser.add_argument(
        "--torchrun-items", type=int, default=10, help="torchruns per repetition (10)"
    )
    parser.add_argument(
        "--backend", choices=("none", "gloo"), default="none", help="process group (none)"
    )
    parser.add_argument("--no-trace", action="store_true", help="skip the traced sweep")
    parser.add_argument("--timeout", type=float, default=180.0, help="per process, s (180)")
    parser.add_argument(
        "--output", type=Path, default=HERE / "results-sweep-throughput.json", help="JSON file"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=("sweep", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--torchrun-worker", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """The driver; or, with ``--child``, ours' launcher; with ``--torchrun-worker``, a worker."""
    opts = parse_args(argv)
    if opts.torchrun_worker:
        folder, item = opts.torchrun_worker
        torchrun_worker(folder, int(item), opts.backend)
        return
    if opts.child:
        child(opts)
        return
    traced = None
    measured = git_state()
    with driving("sweep-throughput-", keep=opts.keep, grace=LEFTOVER_GRACE_S) as scratch:
        reps = measure(opts, scratch)
        if not opts.no_trace:
            traced = traced_sweep(opts, scratch)
    keys = ("items", "reps", "torchrun_items", "backend", "timeout")
    options = {k: vars(opts)[k] for k in keys}
    constants = {"slots": SLOTS, "sleep_s": SLEEP_S, "target_gap_s": TARGET_S}
    machine = {"cores": os.cpu_count(), "python": sys.version.split()[0], **measured}
    machine["changed_meanwhile"] = git_state() != measured  # commits or edits during the run
    result = {"options": options, **constants, **machine, "reps": reps, "traced_sweep": traced}
    opts.output.write_text(json.dumps(result, indent=1))
    print("\n".join(summary(reps, traced, opts)))
    if machine["changed_meanwhile"]:
        print("note: the commit or the package's files changed while this ran", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
