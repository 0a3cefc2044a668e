"""Later runs with standby workers and without, beside torchrun: one host, CPU, 2 gloo workers.

``python -m benchmarks.standby_latency [--reps N] [--torchrun-reps N]``, from the repository root.

Each case is a fresh launcher (``Launcher(hostnames=["localhost"], workers_per_host=2,
backend="gloo", log_dir="", standby=...)``) whose first run is a warm-up (not counted), then
``--reps`` timed ``run()`` calls, each from the call to its return:

* ``noop``: a function that returns ``None``;
* ``gpt2``: a sweep's step that imports ``transformers``, builds a 2-layer GPT-2 from a config
  and computes one loss (the forkserver learns the import after the warm-up: by the timed runs
  it is preloaded, with standby workers or without).

With ``idle``, 0.2 s pass between runs (the standby set is ready when ``run()`` comes, as in a
sweep or a pipeline whose launcher does some work between runs); with ``back-to-back``, the next
``run()`` follows the last one's return at once (the standby set is still being made). The cases
interleave (standby on, off, on, ...), as the machine is noisy. Also: what a ready standby set
holds (each worker's resident and unique memory, from ``/proc`` through psutil) and CPU it uses
in a second of waiting; torchrun's wall time for the same noop (``--nproc-per-node 2``, gloo
process group made and destroyed). Prints medians and ranges; writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = {"noop idle": 0.015, "gpt2 idle": 0.060}


def noop() -> None:
    """The later run's function."""


def gpt2() -> float:
    """One loss of a tiny GPT-2 made from a config (nothing downloaded)."""
    import torch  # noqa: PLC0415 -- in the workers
    import transformers  # noqa: PLC0415

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 256, (2, 16))
    return float(model(ids, labels=ids).loss)


def case(standby: bool, workload: str, idle: float, reps: int) -> list[float]:
    """``reps`` later runs' wall times of one fresh launcher."""
    import torchrunx  # noqa: PLC0415

    fn = noop if workload == "noop" else gpt2
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir="", standby=standby
    ) as launcher:
        launcher.run(fn)  # warm-up: agents, forkserver, the first workers
        launcher.run(fn)  # what it imported is learned now
        times = []
        for _ in range(reps):
            time.sleep(idle)
            start = time.perf_counter()
            launcher.run(fn)
            times.append(time.perf_counter() - start)
    return times


def held() -> dict[str, Any]:
    """What a ready standby set holds, and the CPU it uses in a second of waiting."""
    import psutil  # noqa: PLC0415

    import torchrunx  # noqa: PLC0415

    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir=""
    ) as launcher:
        launcher.run(noop)
        time.sleep(1.0)
        status = launcher.standby_status() or {}
        processes = [psutil.Process(s.pid) for s in status.values() if s.pid is not None]
        before = [sum(p.cpu_times()[:2]) for p in processes]
        time.sleep(1.0)
        cpu = [sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before, strict=True)]
        memory = [p.memory_full_info() for p in processes]
    mib = 1 << 20
    return {
        "workers": len(processes),
        "rss_mib": [m.rss / mib for m in memory],
        "uss_mib": [m.uss / mib for m in memory],
        "cpu_s_per_s": cpu,
    }


def torchrun(reps: int) -> list[float]:
    """Wall times of ``torchrun --nproc-per-node 2`` of a noop that makes a gloo group."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "benchmarks.standby_latency", "--torchrun-worker"],
            cwd=REPO, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        times.append(time.perf_counter() - start)
    return times


def torchrun_worker() -> None:
    """Under torchrun: the same noop, in a process group made and destroyed."""
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group("gloo")
    noop()
    dist.destroy_process_group()


def summary(name: str, values: list[float]) -> str:
    """``name: median (range)``, and the target where there is one."""
    median = statistics.median(values)
    target = TARGETS.get(name)
    goal = "" if target is None else f" (target <= {target * 1e3:.0f} ms: "
    goal += "" if target is None else ("met)" if median <= target else "not met)")
    return f"{name}: {median * 1e3:.1f} ms ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}){goal}"


def main() -> None:
    """Every case, interleaved; the figures printed and written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--torchrun-reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results-standby-latency.json")
    parser.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.torchrun_worker:
        torchrun_worker()
        return
    results: dict[str, dict[str, list[float]]] = {}
    for workload in ("noop", "gpt2"):
        for spacing, idle in (("idle", 0.2), ("back-to-back", 0.0)):
            for standby in (True, False):
                key = f"{workload} {spacing}"
                results.setdefault(key, {})[f"standby={standby}"] = case(
                    standby, workload, idle, opts.reps
                )
    output = {"later_runs_s": results, "held": held(), "torchrun_s": torchrun(opts.torchrun_reps)}
    opts.output.write_text(json.dumps(output, indent=1))
    for key, by in results.items():
        for mode, values in by.items():
            print(summary(key, values) if mode == "standby=True" else f"  {summary(mode, values)}")
    print(summary("torchrun noop", output["torchrun_s"]))
    print(f"a ready standby set: {output['held']}")


if __name__ == "__main__":
    main()
