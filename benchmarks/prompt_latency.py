"""How long a ``breakpoint()`` in a worker takes to show its prompt in the launcher's terminal.

``python -m benchmarks.prompt_latency [RUNS]`` (from the repository root): a launcher under a
pseudo-terminal, 2 gloo workers on localhost; in each run rank 1 writes ``time.time()`` to a file
and calls ``breakpoint()``. The time from that stamp to the prompt on the terminal, first run (a
fresh launcher) and later runs, and the time from ``c`` typed to the run's result. torchrunx
0.4.0 and torchrun have no debugger to compare with: a ``breakpoint()`` in their workers reads
from a stdin that is not the terminal.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pexpect

SCRIPT = """
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torchrunx


def train(stamp):
    if dist.get_rank() == 1:
        Path(stamp).write_text(repr(time.time()))
        breakpoint()
    dist.barrier()
    return dist.get_rank()


with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo",
                        log_dir="") as launcher:
    for _ in range(int(sys.argv[1])):
        print("result", launcher.run(train, sys.argv[2]).by_rank(), time.time(), flush=True)
"""
PROMPT = "(Pdb rank 1 @ localhost) "


def main() -> None:
    """Measure and print the medians."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        script, stamp = Path(tmp, "train.py"), Path(tmp, "stamp")
        script.write_text(SCRIPT)
        env = {**os.environ, "PYTHONPATH": str(repo)}
        child = pexpect.spawn(
            sys.executable, [str(script), str(runs), str(stamp)], env=env, encoding="utf-8"
        )
        prompts, continues = [], []
        try:
            for _ in range(runs):
                child.expect_exact(PROMPT, timeout=120)
                prompts.append(time.time() - float(stamp.read_text()))
                typed = time.time()
                child.sendline("c")
                child.expect(r"result \[0, 1\] ([\d.]+)", timeout=60)
                continues.append(float(child.match.group(1)) - typed)
            child.expect(pexpect.EOF, timeout=60)
        finally:
            child.close(force=True)
    later = prompts[1:] or prompts
    print(f"breakpoint() -> prompt, first run: {prompts[0] * 1e3:.1f} ms")
    print(
        f"breakpoint() -> prompt, later runs: median {statistics.median(later) * 1e3:.1f} ms "
        f"({min(later) * 1e3:.1f}-{max(later) * 1e3:.1f} ms, {len(later)} runs)"
    )
    print(f"'c' -> run() returns: median {statistics.median(continues) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
