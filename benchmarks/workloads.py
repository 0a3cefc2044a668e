"""Functions that the benchmark scenarios run on the workers.

They live in an importable module (the harness puts this folder on ``PYTHONPATH`` of every
process it starts), so the workers can load them whether a launcher ships functions by value or
by reference. The same functions back the ``torchrun`` scenarios through ``torchrun_worker.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from protocol import EVENT_STAMP

#: How long a healthy rank waits for a failing peer before giving up on its own.
HOLD_S = 300.0

#: Names of the stamp files written before and after :func:`print_lines` prints.
PRINT_START_STAMP = "print_start"
PRINT_END_STAMP = "print_end"


def rank() -> int:
    """Global rank of this worker."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def write_stamp(path: Path) -> float:
    """Write the current wall-clock time to ``path`` (atomically) and return it."""
    now = time.time()
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(repr(now))
    tmp.replace(path)
    return now


def read_stamp(path: Path) -> float:
    """Read a time written by :func:`write_stamp`."""
    return float(path.read_text())


def noop() -> None:
    """Do nothing."""


def echo(value: int) -> int:
    """Do nothing but return ``value`` (the runs of ``sweep_in_flight``)."""
    return value


def hostname() -> str:
    """Name of the host this worker runs on."""
    return socket.gethostname()


def sleep(seconds: float) -> None:
    """Sleep on every rank."""
    time.sleep(seconds)


def sigkill_rank1(stamp_dir: str) -> None:
    """Rank 1 stamps the time and SIGKILLs itself; the other ranks wait."""
    if rank() == 1:
        write_stamp(Path(stamp_dir) / EVENT_STAMP)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(HOLD_S)


def raise_in_barrier(stamp_dir: str, delay: float = 0.0) -> None:
    """Rank 1 waits ``delay`` s, stamps the time and raises; the other ranks enter a barrier."""
    if rank() == 1:
        time.sleep(delay)
        write_stamp(Path(stamp_dir) / EVENT_STAMP)
        msg = "rank 1 fails on purpose"
        raise ValueError(msg)
    dist.barrier()


def raise_late_in_barrier(stamp_dir: str) -> None:
    """:func:`raise_in_barrier` 1 s into the run (a fresh forkserver once idled by then)."""
    raise_in_barrier(stamp_dir, 1.0)


def build_tensor(stamp_dir: str, numel: int) -> torch.Tensor:
    """Return a float32 tensor filled with ``rank + 1``; stamp the time it was ready."""
    r = rank()
    tensor = torch.full((numel,), float(r + 1), dtype=torch.float32)
    write_stamp(Path(stamp_dir) / f"built.{r}")
    return tensor


def print_lines(stamp_dir: str, count: int) -> None:
    """Print ``count`` short lines (``line 0``, ``line 1``, ...); stamp the loop's start and end."""
    write_stamp(Path(stamp_dir) / PRINT_START_STAMP)
    for i in range(count):
        print(f"line {i}")
    sys.stdout.flush()
    write_stamp(Path(stamp_dir) / PRINT_END_STAMP)


def gpt2_loss(_stamp_dir: str = "") -> float:
    """Import transformers, build a 2-layer GPT-2 from a config, return one loss.

    The import is what a sweep pays in every run of a fresh process; the model is small.
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415 -- the point

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (1, 32))
    return float(model(ids, labels=ids).loss.detach())
