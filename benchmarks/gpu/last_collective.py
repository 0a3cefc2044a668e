"""On demand, on any number of GPUs: each rank's last NCCL collective, from torch's flight recorder.

``python benchmarks/gpu/last_collective.py``: one worker per GPU all-reduce three times, then
each waits; ``RunHandle.stacks()`` then shows, for each rank, ``last collective #3
nccl:all_reduce, completed``. The run is cancelled after (see RESULTS.md).
"""

import time

import torch
import torch.distributed as dist

import torchrunx
from torchrunx.stack_report import innermost, report


def three_then_wait() -> None:
    """All-reduce three times, then sleep (in the user's code, not a collective)."""
    x = torch.ones(1 << 20, device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    time.sleep(60)


def main() -> None:
    """Start the run, ask for the stacks until every rank sleeps, print the report."""
    with torchrunx.Launcher() as launcher:
        handle = launcher.submit(three_then_wait)
        deadline = time.monotonic() + 60
        stacks: dict[int, str] = {}
        while time.monotonic() < deadline:
            stacks = handle.stacks()
            if stacks and all(innermost(s).startswith("three_then_wait") for s in stacks.values()):
                break
            time.sleep(0.5)
        print(report(stacks))
        for rank, text in sorted(stacks.items()):
            print(rank, [line for line in text.splitlines() if line.startswith("torchrunx: ")])
        handle.cancel()


if __name__ == "__main__":
    main()
