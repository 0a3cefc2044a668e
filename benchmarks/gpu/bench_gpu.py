"""One-GPU NCCL launch benchmark: this torchrunx, torchrunx 0.4.0 and torchrun, side by side.

Each implementation runs the same job: set the device by ``LOCAL_RANK``, make a CUDA tensor and
synchronize (the first CUDA op), then one NCCL ``all_reduce`` (the first collective). Measured:

- ``first run``: in a fresh process, from ``Launcher(...)`` to the return of its first ``run``
  (agents started on the way); torchrun: a whole ``torchrun --nproc-per-node 1`` of the job.
- ``later runs``: the following runs of a sweep on the same launcher (0.4.0 starts its agent
  again for every run); torchrun: the later invocations.
- ``first CUDA op``: from the call of ``run()`` (torchrun: from starting ``torchrun``) to the end
  of the first CUDA op inside the function, on the first run and on later runs.
- ``CUDA init in worker``: from the function's entry to the end of that first CUDA op.
- ``first NCCL all_reduce``: the first collective, which creates the NCCL communicator.
- ``function end to return``: from the end of the function to ``run()`` returning (torchrun: exit).
- ``python + imports``: process start to ``import torch, torchrunx`` done (not in ``first run``).

The two ``torchrunx`` packages share an import name, so every sweep runs in a process of its own,
with that implementation's directory first on ``PYTHONPATH`` and a scratch working directory.

Usage (on a machine with a GPU)::

    python benchmarks/gpu/bench_gpu.py --ours . --v040 /tmp/site040 --out-json r.json

``--ours``/``--v040`` are prepended to ``PYTHONPATH`` (which may hold shared dependencies);
``--impl ours,040,torchrun`` picks implementations; ``--processes`` fresh processes each run a
sweep of ``--sweep`` runs; torchrun is started ``--torchrun-runs`` times. Prints a markdown table
of medians and ratios to ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MARK = "BENCH "


# ---------------------------------------------------------------- the job (runs in workers)


def job(lr: float, device: str = "cuda") -> dict[str, Any]:
    """Set the device, first CUDA op, first NCCL all_reduce; return the times they ended.

    ``device="cpu"`` (with gloo) only checks this script on a machine without a GPU.
    """
    t_fn = time.time()
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    x = torch.full((1,), float(lr), device=device)
    if cuda:
        torch.cuda.synchronize()
    t_cuda = time.time()
    dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    t_nccl = time.time()
    return {
        "t_fn": t_fn,
        "t_cuda": t_cuda,
        "t_nccl": t_nccl,
        "value": x.item(),
        "world": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "pid": os.getpid(),
    }


# ---------------------------------------------------------------- child processes


def child_sweep(impl: str, runs: int, t_spawn: float, device: str) -> None:
    """One fresh process: a launcher, ``runs`` runs of the job; prints one MARK line."""
    import torch  # noqa: F401, PLC0415

    import torchrunx  # noqa: PLC0415

    t_imported = time.time()
    out: dict[str, Any] = {
        "impl": impl,
        "startup": t_imported - t_spawn,
        "torchrunx_file": torchrunx.__file__,
        "torchrunx_version": getattr(torchrunx, "__version__", "?"),
        "runs": [],
    }
    backend = "nccl" if device == "cuda" else "gloo"
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=backend)
    try:
        for i in range(runs):
            lr = 0.1 * (i + 1)
            t_call = time.time()
            value = launcher.run(job, lr, device).rank(0)
            t_ret = time.time()
            if abs(value["value"] - lr) > 1e-6 or value["backend"] != backend:
                msg = f"wrong result: {value}"
                raise RuntimeError(msg)
            out["runs"].append({**_times(t_call, t_ret, value), "pid": value["pid"]})
    finally:
        close = getattr(launcher, "close", None)
        if close is not None:
            close()
    print(MARK + json.dumps(out), flush=True)


def child_torchrun_worker(stamp: str, device: str) -> None:
    """The script torchrun starts: the same job under ``init_process_group("nccl")``."""
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    value = job(0.5, device)
    dist.destroy_process_group()
    Path(stamp).write_text(json.dumps(value))


# ---------------------------------------------------------------- driver


def gpu_holders() -> list[str]:
    """``pid, MiB`` of each process holding GPU memory (nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ["nvidia-smi not found"]
    out = subprocess.run(
        [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def session_leftovers(sid: int) -> list[str]:
    """Processes still in session ``sid`` (the child's): reported, then killed."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != sid:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie holds nothing; its new parent reaps it
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError, IndexError):
            continue
        left.append(f"{pid}: {cmd[:100]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


_CURRENT: list[int] = []
"""The session of the child running now, killed if the driver is stopped."""


def run_child(
    argv: list[str], env: dict[str, str], cwd: str, timeout: float
) -> tuple[int, str, str, list[str]]:
    """Run a child in its own session; ``(returncode, stdout, stderr, leftovers)``."""
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _CURRENT[:] = [proc.pid]
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[timed out after {timeout} s]"
    finally:
        _CURRENT.clear()
    time.sleep(1.0)
    return proc.returncode, stdout, stderr, session_leftovers(proc.pid)


def child_env(extra_path: str | None, scratch: str) -> dict[str, str]:
    """The environment of a child: ``extra_path`` first on PYTHONPATH, logs in ``scratch``."""
    env = dict(os.environ)
    parts = [p for p in (extra_path, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["TORCHRUNX_LOG_DIR"] = str(Path(scratch) / "logs")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _times(t_call: float, t_ret: float, v: dict[str, Any]) -> dict[str, float]:
    return {
        "wall": t_ret - t_call,
        "to_fn": v["t_fn"] - t_call,
        "to_cuda": v["t_cuda"] - t_call,
        "cuda_init": v["t_cuda"] - v["t_fn"],
        "nccl_first": v["t_nccl"] - v["t_cuda"],
        "after_fn": t_ret - v["t_nccl"],
    }


def _walls(runs: list[dict[str, Any]]) -> str:
    return "[" + ", ".join(f"{r['wall']:.2f}" for r in runs) + "]"


def bench_launcher(record: dict[str, Any], impl: str, path: str, args: Namespace) -> None:
    """``--processes`` fresh processes, each a sweep of ``--sweep`` runs, into ``record``."""
    record.update(processes=[], errors=[], leftovers=[], gpu_after=[])
    start = time.monotonic()
    for _ in range(args.processes):
        if record["processes"] and time.monotonic() - start > args.impl_budget:
            print(f"[{impl}] --impl-budget of {args.impl_budget} s spent", flush=True)
            break
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{impl}-") as scratch:
            env = child_env(str(Path(path).resolve()), scratch)
            argv = [
                sys.executable, str(HERE), "sweep", impl, str(args.sweep), repr(time.time()),
                args.device,
            ]  # fmt: skip
            code, stdout, stderr, left = run_child(argv, env, scratch, args.child_timeout)
        lines = [x for x in stdout.splitlines() if x.startswith(MARK)]
        walls = ""
        if code != 0 or not lines:
            record["errors"].append(f"exit {code}: {stderr.strip()[-3000:]}")
        else:
            record["processes"].append(json.loads(lines[-1][len(MARK) :]))
            walls = _walls(record["processes"][-1]["runs"])
        record["leftovers"].extend(left)
        record["gpu_after"].extend(gpu_holders())
        took = time.monotonic() - t0
        print(f"[{impl}] process: exit {code} in {took:.1f} s, runs {walls}, {len(left)} left over")
        save(args)
        if record["errors"] and not record["processes"]:
            break  # broken from the start: no use repeating it


def bench_torchrun(record: dict[str, Any], args: Namespace) -> None:
    """``torchrun --standalone --nproc-per-node 1`` of the job, ``--torchrun-runs`` times."""
    record.update(invocations=[], errors=[], leftovers=[], gpu_after=[])
    start = time.monotonic()
    for _ in range(args.torchrun_runs):
        if record["invocations"] and time.monotonic() - start > args.impl_budget:
            print(f"[torchrun] --impl-budget of {args.impl_budget} s spent", flush=True)
            break
        with tempfile.TemporaryDirectory(prefix="bench-gpu-torchrun-") as scratch:
            stamp = str(Path(scratch) / "stamp.json")
            env = child_env(None, scratch)
            argv = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "1", str(HERE), "torchrun-worker", stamp, args.device,
            ]  # fmt: skip
            t_call = time.time()
            code, _, stderr, left = run_child(argv, env, scratch, args.child_timeout)
            t_ret = time.time() - 1.0  # run_child waits 1 s for leftovers after the exit
            if code != 0 or not Path(stamp).exists():
                record["errors"].append(f"exit {code}: {stderr.strip()[-3000:]}")
            else:
                record["invocations"].append(
                    _times(t_call, t_ret, json.loads(Path(stamp).read_text()))
                )
        record["leftovers"].extend(left)
        record["gpu_after"].extend(gpu_holders())
        print(f"[torchrun] invocation: exit {code}, {_walls(record['invocations'][-1:])}")
        save(args)
        if record["errors"] and not record["invocations"]:
            break


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Medians per implementation and metric."""
    rows: dict[str, dict[str, float | None]] = {}
    for impl, rec in results.items():
        if impl == "torchrun":
            runs = rec["invocations"]
            first, later, startup = runs[:1], runs[1:], []
        else:
            first = [p["runs"][0] for p in rec["processes"] if p["runs"]]
            later = [r for p in rec["processes"] for r in p["runs"][1:]]
            startup = [p["startup"] for p in rec["processes"]]
        rows[impl] = {
            "first run (s)": _median([r["wall"] for r in first]),
            "later runs (s)": _median([r["wall"] for r in later]),
            "first CUDA op, first run (s)": _median([r["to_cuda"] for r in first]),
            "first CUDA op, later runs (s)": _median([r["to_cuda"] for r in later]),
            "function entry, later runs (s)": _median([r["to_fn"] for r in later]),
            "CUDA init in worker (s)": _median([r["cuda_init"] for r in first + later]),
            "first NCCL all_reduce (s)": _median([r["nccl_first"] for r in first + later]),
            "function end to return, later runs (s)": _median([r["after_fn"] for r in later]),
            "python + imports (s)": _median(startup),
        }
    return rows


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(results: dict[str, Any]) -> str:
    """A markdown table: medians per implementation, ratios to ours."""
    rows = summarize(results)
    if not rows:
        return "(nothing measured)"
    impls = list(rows)
    others = [i for i in impls if i != "ours"] if "ours" in rows else []
    head = ["metric (median)", *impls, *(f"{i} / ours" for i in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for metric in next(iter(rows.values())):
        cells = [metric, *(_cell(rows[i][metric]) for i in impls)]
        for other in others:
            ours, theirs = rows["ours"][metric], rows[other][metric]
            cells.append(f"{theirs / ours:.1f}x" if ours and theirs is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    counts = []
    for impl, rec in results.items():
        if impl == "torchrun":
            n = f"{len(rec['invocations'])} invocations"
        else:
            n_runs = sum(len(p["runs"]) for p in rec["processes"])
            n = f"{len(rec['processes'])} processes, {n_runs} runs"
        extra = f", {len(rec['errors'])} failed" if rec["errors"] else ""
        left = f", leftovers: {rec['leftovers']}" if rec["leftovers"] else ""
        gpu = f", GPU held after: {sorted(set(rec['gpu_after']))}" if rec["gpu_after"] else ""
        counts.append(f"- {impl}: {n}{extra}{left}{gpu}")
    return "\n".join([*lines, "", *counts])


def parse_args() -> Namespace:
    """The driver's options (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ours", default=str(HERE.parents[2]), help="dir holding our torchrunx")
    parser.add_argument("--v040", default=None, help="dir holding torchrunx 0.4.0 (--target)")
    parser.add_argument("--impl", default="ours,040,torchrun")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--sweep", type=int, default=6)
    parser.add_argument("--torchrun-runs", type=int, default=5)
    parser.add_argument("--child-timeout", type=float, default=100, help="seconds per process")
    parser.add_argument(
        "--impl-budget", type=float, default=140, help="no new process of an impl after this"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a check")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--out-md", default=None)
    args = parser.parse_args()
    for impl in args.impl.split(","):
        if impl not in {"ours", "040", "torchrun"}:
            parser.error(f"unknown implementation {impl!r}")
        if impl == "040" and args.v040 is None:
            parser.error("--v040 is needed for --impl 040")
    return args


RESULTS: dict[str, Any] = {}
"""What has been measured so far, by implementation (saved after every child)."""


def save(args: Namespace) -> str:
    """Write ``--out-json`` and ``--out-md`` with what has been measured; return the table."""
    text = table({k: v for k, v in RESULTS.items() if v})
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(RESULTS, indent=1))
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
    return text


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Driver, or one of the child modes (``sweep``, ``torchrun-worker``)."""
    if len(sys.argv) > 1 and sys.argv[1] == "sweep":
        child_sweep(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "torchrun-worker":
        child_torchrun_worker(sys.argv[2], sys.argv[3])
        return
    args = parse_args()
    signal.signal(signal.SIGTERM, _stop)  # `timeout` stops us: still print what we have
    try:
        for impl in args.impl.split(","):
            RESULTS[impl] = {}
            if impl == "torchrun":
                bench_torchrun(RESULTS[impl], args)
            else:
                path = args.ours if impl == "ours" else args.v040
                bench_launcher(RESULTS[impl], impl, path, args)
    finally:
        for pid in _CURRENT:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        print(save(args))
        for impl, rec in RESULTS.items():
            for error in rec.get("errors", []):
                print(f"\n[{impl}] error:\n{error}")


if __name__ == "__main__":
    main()
