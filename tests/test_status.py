"""``RunHandle.status()``: how every rank of a run in flight is, on one host and on test hosts."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from testbed.cluster import Cluster


def busy_until(path: str) -> int:
    """Rank 1 holds 64 MiB and spins; everyone says hello, then waits for ``path``."""
    print(f"hello from rank {dist.get_rank()}", flush=True)
    held = bytearray(64 << 20) if dist.get_rank() == 1 else bytearray()
    while not Path(path).exists():
        if dist.get_rank() != 1:
            time.sleep(0.01)
    dist.barrier()
    return len(held)


def status_when(handle: torchrunx.RunHandle[int], ranks: int) -> dict[int, torchrunx.RankStatus]:
    """The status once every rank runs and has said hello, and rank 1 has spun a while."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = handle.status()
        if (
            len(status) == ranks
            and all(
                s.state == "running" and s.last_line.startswith("hello") for s in status.values()
            )
            and status[1].seconds > 1
        ):
            return status
        time.sleep(0.2)
    raise AssertionError(handle.status())


def test_status_of_every_rank_while_it_runs_and_after(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=3, backend="gloo") as lau:
        lau.run(os.getpid)
        handle = lau.submit(busy_until, str(go))
        status = status_when(handle, 3)
        for rank, s in status.items():
            assert (s.rank, s.hostname, s.local_rank) == (rank, "localhost", rank)
            assert s.pid is not None
            assert s.last_line == f"hello from rank {rank}"
            assert s.since_output is not None
            assert s.since_output >= 0
            assert s.gpu_memory is None  # no GPU here
            assert s.rss > 0
        assert status[1].rss > status[0].rss + (48 << 20)  # the 64 MiB it holds
        assert status[1].cpu_percent > 50  # it spins
        assert status[0].cpu_percent < 50  # it sleeps
        table = str(status).splitlines()  # readable: one line per rank
        assert len(table) == 3
        assert table[1].startswith(f"rank 1 localhost[1] running pid {status[1].pid} ")
        assert "MiB" in table[1]
        assert table[1].endswith("% CPU: hello from rank 1")
        go.touch()
        assert handle.result(timeout=60).by_rank() == [0, 64 << 20, 0]
        after = handle.status()
    assert {s.state for s in after.values()} == {"cleared"}
    assert [s.pid for s in after.values()] == [status[r].pid for r in range(3)]


def test_status_of_a_run_that_has_not_started_its_workers_yet() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as lau:
        handle = lau.submit(time.sleep, 3)
        first = handle.status()
        assert set(first) == {0, 1}
        assert {s.state for s in first.values()} <= {"starting", "running"}
        handle.result(timeout=60)


def test_status_on_three_test_hosts(cluster: Cluster, tmp_path: Path) -> None:
    go = tmp_path / "go"  # the hosts share this machine's filesystem
    hosts = cluster.hostnames[:3]
    launcher = torchrunx.Launcher(
        hostnames=hosts, workers_per_host=2, backend="gloo", ssh_config_file=cluster.ssh_config
    )
    with launcher:
        handle = launcher.submit(busy_until, str(go))
        status = status_when(handle, 6)
        go.touch()
        handle.result(timeout=60)
    assert [s.hostname for s in status.values()] == [h for h in hosts for _ in range(2)]
    assert [s.local_rank for s in status.values()] == [0, 1] * 3
    assert len({s.pid for s in status.values()}) == 6
