"""Standby workers: the next run's processes ready before it is asked for, on real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def me() -> dict[str, Any]:
    """A run's function: which process, in which group, seeing which variable."""
    return {
        "pid": os.getpid(),
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "value": os.environ.get("TORCHRUNX_TEST_VALUE"),
        "run_id": os.environ["TORCHRUNX_RUN_ID"],
    }


def standby_pids(launcher: torchrunx.Launcher, ranks: int = 2, timeout: float = 30) -> list[int]:
    """The standby workers' pids, once every one of them is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = launcher.standby_status(timeout=5)
        ready = status is not None and len(status) == ranks
        if status is not None and ready and all(s.state == "standby" for s in status.values()):
            return [s.pid for _, s in sorted(status.items()) if s.pid is not None]
        time.sleep(0.05)
    pytest.fail(f"no standby workers ready: {launcher.standby_status()}")


def gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)]
        if not alive or all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in alive):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[torchrunx.Launcher]:
    monkeypatch.setenv("TORCHRUNX_TEST_VALUE", "first")  # copied: TORCH* is a default pattern
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir=""
    ) as launcher:
        yield launcher


def test_a_later_run_takes_the_standby_workers_and_leaves_none_behind(
    launcher: torchrunx.Launcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUNX_TRACE", str(tmp_path))  # before: a change would not match
    first = launcher.run(me).by_rank()
    ready = standby_pids(launcher)
    assert not set(ready) & {r["pid"] for r in first}  # fresh processes, no earlier run's
    handle = launcher.submit(me)
    later = handle.result()
    assert [r["pid"] for r in later] == ready  # the standby path
    assert [(r["rank"], r["world"], r["value"]) for r in later] == [
        (0, 2, "first"),
        (1, 2, "first"),
    ]
    assert {r["run_id"] for r in later} == {handle.run_id}
    assert gone(ready)  # run() returned: no process of that run is left
    trace = json.loads((tmp_path / f"{handle.run_id}.json").read_text())
    assert trace["otherData"] == {"path": "standby"}
    assert standby_pids(launcher) != ready  # the next run's set, made afresh


def test_a_changed_environment_gets_fresh_workers_that_see_it(
    launcher: torchrunx.Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher.run(me)
    stale = standby_pids(launcher)
    monkeypatch.setenv("TORCHRUNX_TEST_VALUE", "second")
    later = launcher.run(me).by_rank()
    assert [r["value"] for r in later] == ["second", "second"]
    assert not {r["pid"] for r in later} & set(stale)  # not handed to the stale set
    assert gone(stale)  # which is gone, and replaced by one that sees the new value
    standby_pids(launcher)
    assert [r["value"] for r in launcher.run(me).by_rank()] == ["second", "second"]


def test_views_and_sweeps_take_fresh_workers_and_leave_the_set(
    launcher: torchrunx.Launcher,
) -> None:
    launcher.run(me)
    ready = standby_pids(launcher)
    one = launcher.view(workers_per_host=1).run(me).rank(0)
    assert one["pid"] not in ready
    assert one["world"] == 1
    swept = [o.rank(0)["pid"] for _, o in launcher.sweep(lambda _: me(), [0, 1]).outcomes()]  # type: ignore[union-attr]
    assert not set(swept) & set(ready)
    assert standby_pids(launcher) == ready  # still there, for a run of the launcher's shape
    assert [r["pid"] for r in launcher.run(me)] == ready


def test_a_standby_worker_that_died_is_replaced_not_handed_a_run(
    launcher: torchrunx.Launcher,
) -> None:
    launcher.run(me)
    ready = standby_pids(launcher)
    os.kill(ready[1], signal.SIGKILL)
    assert gone(ready)  # its set is torn down...
    replaced = standby_pids(launcher)  # ...and replaced
    assert not set(replaced) & set(ready)
    assert [r["pid"] for r in launcher.run(me)] == replaced


def test_waiting_standby_workers_use_no_cpu(launcher: torchrunx.Launcher) -> None:
    launcher.run(me)
    processes = [psutil.Process(p) for p in standby_pids(launcher)]
    time.sleep(0.3)  # past their set-up
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(1.0)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before, strict=True)]
    assert all(u < 0.02 for u in used), used  # seconds of CPU in a second of waiting


def test_standby_off_and_close_leave_no_standby_process() -> None:
    with torchrunx.Launcher(workers_per_host=2, backend="gloo", log_dir="", standby=False) as off:
        off.run(me)
        time.sleep(0.5)
        assert off.standby_status() is None
    on = torchrunx.Launcher(workers_per_host=2, backend="gloo", log_dir="")
    on.run(me)
    ready = standby_pids(on)
    on.close()
    assert gone(ready)


def test_a_run_of_another_launcher_ends_this_one_s_standby_set(
    launcher: torchrunx.Launcher,
) -> None:
    launcher.run(me)
    ready = standby_pids(launcher)
    with torchrunx.Launcher(workers_per_host=1, backend="gloo", log_dir="") as other:
        other.run(me)  # a second stage on the same devices: the first's set is in its way
        assert gone(ready)
        assert launcher.standby_status() is None
    launcher.run(me)
    assert not set(standby_pids(launcher)) & set(ready)  # made again after its own next run
