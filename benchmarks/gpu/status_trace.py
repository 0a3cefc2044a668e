"""On a GPU machine: each rank's GPU memory in ``status()``, CUDA phases in the run's trace.

``RunHandle.status()`` reports each rank's GPU memory, and the run's trace
(``TORCHRUNX_TRACE``) has its CUDA context and process group phases.

``TORCHRUNX_TRACE=/tmp/traces python benchmarks/gpu/status_trace.py``: one worker per GPU
holds 2 GiB on its GPU for a few seconds; the status taken meanwhile and the phases of the
trace are printed (see RESULTS.md).
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import torchrunx


def hold_memory() -> int:
    """Hold 2 GiB on this rank's GPU for 4 s."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dist.all_reduce(torch.ones(1, device="cuda"))
    time.sleep(4)
    return x.numel()


def main() -> None:
    """Run it, take the status while it holds the memory, print the trace's phases."""
    with torchrunx.Launcher() as launcher:
        launcher.run(hold_memory)  # the agents are up: the next run is a later one
        handle = launcher.submit(hold_memory)
        time.sleep(3)
        for rank, s in handle.status().items():
            gib = None if s.gpu_memory is None else round(s.gpu_memory / 2**30, 2)
            print(
                f"rank {rank}: {s.state}, pid {s.pid}, GPU memory {gib} GiB, RSS {s.rss >> 20} MiB"
            )
        handle.result()
    trace = json.loads((Path(os.environ["TORCHRUNX_TRACE"]) / f"{handle.run_id}.json").read_text())
    for e in sorted(trace["traceEvents"], key=lambda e: e.get("ts", 0)):
        if e["ph"] == "X":
            start, length = e["ts"] / 1e3, e["dur"] / 1e3
            print(f"  rank {e['tid']}: {e['name']:16} {start:8.1f} ms  +{length:.1f} ms")


if __name__ == "__main__":
    main()
