"""From a rank's death to the next attempt's workers in the function: ours and torchrun.

``python -m benchmarks.restart_latency [--reps N] [--later N]``, from the repository root.

One host, CPU, gloo, 2 workers. On the first attempt rank 1 writes ``time.time()`` to a file
and SIGKILLs itself (``os.kill(os.getpid(), signal.SIGKILL)``) while rank 0 sleeps; on the
second attempt every rank writes ``time.time()`` as it enters the function and returns. A
restart's latency is the latest rank's entry minus the death; the first rank's entry is noted
too. Nothing is subtracted.

* **ours**: ``Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo",
  max_restarts=1)`` in a fresh process (this module, ``--child``), whose first ``run()`` is the
  measured one (``first``), followed by ``--later`` more on the same, warm launcher
  (``later``). Workers find the attempt in ``TORCHRUNX_RESTART_COUNT``. The launcher's process
  also notes when it took the first attempt's failure (``Run._failed``, once every process of
  that attempt is gone), which splits the latency in two hops.
* **torchrun**: ``python -m torch.distributed.run --standalone --max-restarts 1
  --nproc-per-node 2`` of this file (``--torchrun-worker``), with the same Python and torch, and
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the agent's store shared (``--torchrun-rdzv
  standalone-shared``, or the static rendezvous, ``static``), a second attempt's gloo may read
  the first attempt's addresses and fail or hang. Its workers find the attempt in
  ``TORCHELASTIC_RESTART_COUNT``; the function is entered right after
  ``dist.init_process_group("gloo")``, which ours does before calling it. Its agent looks at its
  workers every ``--monitor-interval`` s (torchrun's default, 0.1 s, unless given): a death is
  seen up to that late, and that wait is part of its figure.

Whole run: ours, from just before this driver starts the launcher's process to the return of
its first ``run()`` (interpreter, imports, agents, both attempts; not ``close()``), and the
wall time of each later ``run()``; torchrun, from just before it is started to its exit.

The repetitions (``--reps``) interleave ours and torchrun (one each, in alternating order), as
the machine is noisy. Every wait is bounded (``--timeout`` per process); whatever a repetition
started that still runs 5 s after it is reported and killed. Prints the medians and ranges,
the target (<= 200 ms for ours) and torchrun's median over ours; writes ``--output`` (JSON:
every repetition). torchrunx 0.4.0 has no restarts: nothing to measure there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import driving, leftovers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKERS = 2
HOLD_S = 60.0  # how long rank 0 of the first attempt waits to be torn down
TARGET_S = 0.200  # ours, from the death to every rank of the next attempt in the function
LEFTOVER_GRACE_S = 5.0
DIED = "died"  # the stamp of rank 1's death, in a run's folder
ENTERED = "entered"  # entered.RANK: that rank's entry on the second attempt
COMPARISON = "torchrunx 0.4.0 has no restarts (no max_restarts): nothing to compare there."


# --- in the workers (ours, and torchrun's through --torchrun-worker) ----------------------------


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` as JSON, atomically."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def process_started() -> float:
    """When this process was created (fork), in ``time.time()`` terms, to a clock tick (10 ms)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def die_then_enter(stamp_dir: str, attempt: int, **extra: float) -> int:
    """Attempt 0: rank 1 stamps its death and SIGKILLs itself, rank 0 waits. Later: the entry."""
    entered = time.time()
    rank = os.environ["RANK"]
    if attempt == 0:
        if rank == "1":
            write_json(Path(stamp_dir) / DIED, time.time())
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(HOLD_S)  # torn down long before
        return attempt
    stamps = {"entered": entered, "process": process_started(), "attempt": attempt, **extra}
    write_json(Path(stamp_dir) / f"{ENTERED}.{rank}", stamps)
    return attempt


def ours_worker(stamp_dir: str) -> int:
    """Ours: the attempt from ``TORCHRUNX_RESTART_COUNT``."""
    return die_then_enter(stamp_dir, int(os.environ["TORCHRUNX_RESTART_COUNT"]))


def torchrun_worker(stamp_dir: str) -> None:
    """The worker script of torchrun: the process group first, then the same function."""
    script = time.time()
    import torch.distributed as dist  # noqa: PLC0415 -- the import is part of a worker's start

    imported = time.time()
    dist.init_process_group(backend="gloo")
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    die_then_enter(stamp_dir, attempt, script=script, imported=imported)
    dist.destroy_process_group()


# --- the launcher's process (--child) -----------------------------------------------------------


def child(opts: argparse.Namespace) -> None:
    """Ours: a fresh launcher; its first run and ``--later`` more; a report in the folder."""
    folder = Path(opts.child)
    report: dict[str, Any] = {}
    try:
        measure_ours(folder, opts.later, report)
    except Exception as e:  # noqa: BLE001 -- reported to the driver, which prints it
        report["error"] = f"{type(e).__name__}: {e}"
    write_json(folder / "report.json", report)


def measure_ours(folder: Path, later: int, report: dict[str, Any]) -> None:
    """The runs, each in a folder of its own: when it started, failed, returned."""
    import torchrunx  # noqa: PLC0415 -- not in torchrun's workers
    from torchrunx import runs  # noqa: PLC0415

    # the workers' function by reference to this module, not by value from __main__
    here = importlib.import_module("benchmarks.restart_latency")
    failed: list[float] = []
    take = runs.Run._failed  # noqa: SLF001 -- when the launcher took the attempt's failure

    def noted(run: runs.Run, error: BaseException) -> None:
        failed.append(time.time())
        take(run, error)

    runs.Run._failed = noted  # type: ignore[method-assign]  # noqa: SLF001
    report["launcher_made"] = time.time()
    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=WORKERS, backend="gloo", max_restarts=1,
        log_dir=str(folder / "logs"),
    )  # fmt: skip
    report["runs"] = []
    with launcher:
        for i in range(1 + later):
            stamps = folder / f"run{i}"
            stamps.mkdir()
            failed.clear()
            submitted = time.time()
            result = launcher.run(here.ours_worker, str(stamps))
            returned = time.time()
            kinds = [type(e).__name__ for e in result.restarts]
            if result.by_rank() != [1] * WORKERS or kinds != ["WorkerFailedError"]:
                msg = f"run {i}: returned {result.by_rank()}, after {kinds}"
                raise RuntimeError(msg)
            entry = {"dir": stamps.name, "submitted": submitted, "returned": returned}
            report["runs"].append({**entry, "failed": failed[0] if failed else None})
    report["closed"] = time.time()


# --- the driver ---------------------------------------------------------------------------------


def run_process(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[float, float, int | None]:
    """Start ``cmd`` in a session of its own; (started, exited, its code; None: killed)."""
    with log.open("ab") as out:
        started = time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    code: int | None = None
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        exited = time.time()
        if code is None:  # timed out, or interrupted: its session goes (the rest: leftovers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return started, exited, code


def read_json(path: Path) -> Any:
    """A stamp or report; None if it was never written."""
    return json.loads(path.read_text()) if path.exists() else None


def restart_of(stamps: Path, code: int | None = 0) -> dict[str, Any]:
    """The death, the entries, and the latencies, of one run's folder (``code``: torchrun's)."""
    if code != 0:
        msg = f"torchrun exited with {code}" if code is not None else "torchrun timed out"
        raise RuntimeError(msg)
    died = read_json(stamps / DIED)
    entered = [read_json(stamps / f"{ENTERED}.{r}") for r in range(WORKERS)]
    if died is None or any(e is None for e in entered):
        missing = [r for r, e in enumerate(entered) if e is None]
        msg = f"{stamps.name}: no death stamp" if died is None else f"ranks {missing} never entered"
        raise RuntimeError(msg)
    last = max(e["entered"] for e in entered)
    return {
        "latency_s": last - died,
        "first_rank_s": min(e["entered"] for e in entered) - died,
        "process_s": max(e["process"] for e in entered) - died,
        "entries": entered,
        "died": died,
    }


def child_report(folder: Path, code: int | None) -> dict[str, Any]:
    """What the launcher's process reported; its error raised here."""
    report = read_json(folder / "report.json")
    if report is None:
        msg = f"the launcher's process exited ({code}) without a report"
        raise RuntimeError(msg)
    if "error" in report:
        raise RuntimeError(report["error"])
    return report


def ours_repetition(scratch: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """One launcher's process: its first run and the later ones."""
    folder = Path(tempfile.mkdtemp(prefix="ours-", dir=scratch))
    cmd = [sys.executable, "-m", "benchmarks.restart_latency", "--child", str(folder)]
    cmd += ["--later", str(opts.later)]
    started, exited, code = run_process(cmd, scratch / "ours.log", opts.timeout)
    entry: dict[str, Any] = {"exit_code": code, "process_s": exited - started}
    try:
        report = child_report(folder, code)
        entry["runs"] = []
        for i, run in enumerate(report["runs"]):
            found = restart_of(folder / run["dir"])
            found["run_s"] = run["returned"] - run["submitted"]
            if i == 0:
                found["whole_s"] = run["returned"] - started
                found["launcher_s"] = run["returned"] - report["launcher_made"]
            if run["failed"] is not None:
                found["death_to_failed_s"] = run["failed"] - found["died"]
                found["failed_to_last_s"] = found["died"] + found["latency_s"] - run["failed"]
            entry["runs"].append(found)
    except Exception as e:  # noqa: BLE001 -- this repetition's error, in the report
        entry["error"] = f"{type(e).__name__}: {e}"
    entry["left_running"] = leftovers(LEFTOVER_GRACE_S)
    return entry


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun_repetition(scratch: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """One ``torchrun --max-restarts 1``, of this file as its worker script."""
    folder = Path(tempfile.mkdtemp(prefix="torchrun-", dir=scratch))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "1"]
    cmd += ["--nproc-per-node", str(WORKERS)]
    env = dict(os.environ)
    if opts.torchrun_rdzv == "static":
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        cmd += ["--standalone"]
        if opts.torchrun_rdzv == "standalone":  # the workers' store is not the agent's
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if opts.monitor_interval is not None:
        cmd += ["--monitor-interval", str(opts.monitor_interval)]
    # as a module, from the repository root: the worker imports benchmarks.processes
    cmd += ["-m", "benchmarks.restart_latency", "--torchrun-worker", str(folder)]
    started, exited, code = run_process(cmd, scratch / "torchrun.log", opts.timeout, env)
    entry: dict[str, Any] = {"exit_code": code, "process_s": exited - started}
    try:
        found = restart_of(folder, code)
        found["whole_s"] = exited - started
        entries = found["entries"]
        found["script_s"] = max(e["script"] for e in entries) - found["died"]
        found["imported_s"] = max(e["imported"] for e in entries) - found["died"]
        entry["runs"] = [found]
    except Exception as e:  # noqa: BLE001 -- this repetition's error, in the report
        entry["error"] = f"{type(e).__name__}: {e}"
    entry["left_running"] = leftovers(LEFTOVER_GRACE_S)
    return entry


def measure(opts: argparse.Namespace, scratch: Path) -> dict[str, list[dict[str, Any]]]:
    """``--reps`` of ours and of torchrun, interleaved, in alternating order."""
    reps: dict[str, list[dict[str, Any]]] = {"ours": [], "torchrun": []}
    sides = {"ours": ours_repetition, "torchrun": torchrun_repetition}
    for i in range(opts.reps):
        order = ["ours", "torchrun"] if i % 2 == 0 else ["torchrun", "ours"]
        for side in order:
            entry = sides[side](scratch, opts)
            reps[side].append(entry)
            got = entry.get("error") or ", ".join(ms(r["latency_s"]) for r in entry["runs"])
            print(f"  {i + 1}/{opts.reps} {side}: {got}", file=sys.stderr, flush=True)
    return reps


# --- the report ---------------------------------------------------------------------------------


def ms(value: float) -> str:
    """Milliseconds below one second (three significant figures), else seconds."""
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def median(values: list[float]) -> float:
    """The median of ``values``."""
    # not imported at the top: the workers import this module too, and statistics imports
    # decimal (150 ms here), which would be part of every restart measured
    import statistics  # noqa: PLC0415

    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median (min-max)``."""
    return f"{ms(median(values))} ({ms(min(values))}-{ms(max(values))})"


CASES = (
    ("ours, first run", "ours", 0),
    ("ours, later runs", "ours", 1),
    ("torchrun", "torchrun", 0),
)
HOPS = {
    "ours": (
        ("first_rank_s", "death -> first rank in"),
        ("death_to_failed_s", "death -> launcher takes the failure (attempt torn down)"),
        ("failed_to_last_s", "that -> latest rank in (fork, rendezvous, process group)"),
        ("process_s", "death -> latest new worker forked (to 10 ms)"),
    ),
    "torchrun": (
        ("first_rank_s", "death -> first rank in"),
        ("process_s", "death -> latest new worker process (to 10 ms)"),
        ("script_s", "death -> latest worker script running"),
        ("imported_s", "death -> latest worker with torch imported"),
    ),
}


def case_runs(reps: list[dict[str, Any]], which: int) -> list[dict[str, Any]]:
    """The first runs (``which`` 0) or the later runs (1) of every repetition without error."""
    runs = [e["runs"] for e in reps if "runs" in e]
    return [r[0] for r in runs] if which == 0 else [x for r in runs for x in r[1:]]


def summary(reps: dict[str, list[dict[str, Any]]], opts: argparse.Namespace) -> list[str]:
    """A Markdown table (latency, whole run), the ratio, the hops, and what went wrong."""
    rows = [
        "| case | restart: median (min-max) | target | whole run: median (min-max) | runs |",
        "| --- | --- | --- | --- | --- |",
    ]
    medians: dict[str, float] = {}
    notes = []
    for title, side, which in CASES:
        runs = case_runs(reps[side], which)
        if not runs:
            continue
        latencies = [r["latency_s"] for r in runs]
        medians[title] = median(latencies)
        whole_key = "run_s" if which else "whole_s"
        whole = spread([r[whole_key] for r in runs])
        target = f"<= {ms(TARGET_S)}" if side == "ours" else ""
        rows.append(f"| {title} | {spread(latencies)} | {target} | {whole} | {len(runs)} |")
        parts = [f"{t} {spread(v)}" for k, t in HOPS[side] if (v := [r[k] for r in runs if k in r])]
        notes.append(f"{title}: " + "; ".join(parts))
    for title in ("ours, first run", "ours, later runs"):
        if title in medians and "torchrun" in medians:
            ratio = medians["torchrun"] / medians[title]
            notes.append(f"torchrun / {title} (medians): {ratio:.1f}")
    interval = opts.monitor_interval if opts.monitor_interval is not None else "0.1 (default)"
    notes.append(f"torchrun: --monitor-interval {interval} s, rendezvous {opts.torchrun_rdzv}")
    for side, entries in reps.items():
        notes += [
            f"{side} rep {i + 1}: {e['error']}" for i, e in enumerate(entries) if "error" in e
        ]
        notes += [
            f"{side} rep {i + 1}: left running: {e['left_running']}"
            for i, e in enumerate(entries)
            if e["left_running"]
        ]
    whole = (
        "whole run: ours (first run), from starting the launcher's process to its first run()'s "
        "return; ours (later runs), each run(); torchrun, from its start to its exit"
    )
    return [*rows, "", *notes, whole, "", COMPARISON]


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.restart_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each (10)")
    parser.add_argument(
        "--later", type=int, default=2, help="more restarted runs per launcher of ours (2)"
    )
    parser.add_argument(
        "--monitor-interval", type=float, help="torchrun's --monitor-interval (its default)"
    )
    parser.add_argument(
        "--torchrun-rdzv",
        choices=("standalone", "standalone-shared", "static"),
        default="standalone",
        help="torchrun's rendezvous: --standalone with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
        "(standalone, the default), --standalone as it is (standalone-shared), or "
        "--master-addr/--master-port (static); see the README",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per process, s (120)")
    parser.add_argument(
        "--output", type=Path, default=HERE / "results-restart-latency.json", help="JSON file"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--torchrun-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """The driver; or, with ``--child``, ours' launcher; with ``--torchrun-worker``, a worker."""
    opts = parse_args(argv)
    if opts.torchrun_worker:
        torchrun_worker(opts.torchrun_worker)
        return
    if opts.child:
        child(opts)
        return
    with driving("restart-latency-", keep=opts.keep, grace=LEFTOVER_GRACE_S) as scratch:
        reps = measure(opts, scratch)
    keys = ("reps", "later", "monitor_interval", "torchrun_rdzv", "timeout")
    options = {k: vars(opts)[k] for k in keys}
    opts.output.write_text(json.dumps({"reps": reps, "options": options}, indent=1))
    print("\n".join(summary(reps, opts)))


if __name__ == "__main__":
    main(sys.argv[1:])
