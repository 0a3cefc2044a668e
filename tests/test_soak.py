"""Many runs on one launcher, each with a fault on a random rank: every outcome is right, and once
``run()`` has returned or raised, no process of that run exists in any state (not even a zombie
or a process still exiting: on a GPU, such a process can still hold memory)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import torchrunx

RUNS = int(os.environ.get("TORCHRUNX_SOAK_RUNS", "200"))
FAULTS = ("none", "raise", "sigkill", "sigsegv", "os_exit", "sys_exit", "child", "dataloader")


def _started(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process for good."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def _record(folder: str) -> None:
    me = os.getpid()
    Path(folder, str(me)).write_text(_started(me))


class _Squares(torch.utils.data.Dataset[int]):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        _record(self.folder)  # in the DataLoader's worker process
        return i * i


def faulty(fault: str, victim: int, folder: str) -> int:
    """One rank (``victim``) does ``fault``; every process of the run records itself."""
    _record(folder)
    rank = dist.get_rank()
    if rank == victim:
        if fault == "raise":
            msg = "a fault on purpose"
            raise ValueError(msg)
        if fault in ("sigkill", "sigsegv"):
            os.kill(os.getpid(), signal.SIGKILL if fault == "sigkill" else signal.SIGSEGV)
        if fault == "os_exit":
            os._exit(3)
        if fault == "sys_exit":
            sys.exit(4)
        if fault == "child":  # left running, 200 MiB in hand: freeing them takes its exit a while
            hold = (
                "import sys, time; memory = b'x' * (200 << 20); print(flush=True); time.sleep(600)"
            )
            child = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
            assert child.stdout is not None
            child.stdout.readline()  # it holds the memory now
            Path(folder, str(child.pid)).write_text(_started(child.pid))
        if fault == "dataloader":
            loader = torch.utils.data.DataLoader(_Squares(folder), batch_size=4, num_workers=2)
            assert sum(int(b.sum()) for b in loader) == sum(i * i for i in range(8))
    dist.barrier()
    return rank


def _left(folder: Path) -> list[str]:
    """The recorded processes of a run that still exist, in any state."""
    left = []
    for record in folder.iterdir():
        pid = int(record.name)
        try:
            if _started(pid) == record.read_text():
                left.append(f"{pid} ({Path(f'/proc/{pid}/stat').read_text().split()[2]})")
        except OSError:
            continue  # gone
    return left


def test_soak_every_run_ends_with_nothing_left(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=3, backend="gloo", log_dir=""
    )
    with launcher:
        for i in range(RUNS):
            fault, victim = rng.choice(FAULTS), rng.randrange(3)
            folder = tmp_path / f"run{i}"
            folder.mkdir()
            try:
                outcome: object = launcher.run(faulty, fault, victim, str(folder)).by_rank()
            except Exception as e:  # noqa: BLE001 -- the type is what is checked
                outcome = type(e)
            expected = {
                "raise": ValueError,
                "sigkill": torchrunx.WorkerFailedError,
                "sigsegv": torchrunx.WorkerFailedError,
                "os_exit": torchrunx.WorkerFailedError,
                "sys_exit": torchrunx.WorkerFailedError,
            }.get(fault, [0, 1, 2])
            assert outcome == expected, f"run {i}: {fault} on rank {victim}: {outcome}"
            left = _left(folder)
            assert not left, f"run {i}: {fault} on rank {victim}: still there: {left}"
