"""``TORCHRUNX_TRACE``: each run writes its timeline as a Chrome / Perfetto trace-event file."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from testbed.cluster import Cluster

RANK_PHASES = {"fork", "start", "rendezvous", "unpickle", "process group", "function", "pickle"}


def nap() -> int:
    time.sleep(0.3)
    return dist.get_rank()


def spans(trace: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """Complete events by (thread, name)."""
    return {(e["tid"], e["name"]): e for e in trace["traceEvents"] if e["ph"] == "X"}


def names(trace: dict[str, Any], kind: str) -> dict[Any, str]:
    key = "pid" if kind == "process_name" else "tid"
    events = trace["traceEvents"]
    return {e[key]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == kind}


def test_each_run_writes_its_timeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_TRACE", str(tmp_path / "traces"))
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        first = lau.submit(nap)
        first.result(timeout=120)
        second = lau.submit(nap)
        second.result(timeout=60)
    files = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert files == sorted([f"{first.run_id}.json", f"{second.run_id}.json"])
    trace = json.loads((tmp_path / "traces" / f"{second.run_id}.json").read_text())
    got = spans(trace)
    for rank in (0, 1):
        assert {n for t, n in got if t == rank} >= {*RANK_PHASES, "teardown", "to the launcher"}
        function = got[rank, "function"]
        assert function["dur"] >= 0.3e6
        assert got[rank, "rendezvous"]["ts"] <= function["ts"]  # in order on one clock
        assert got[rank, "teardown"]["ts"] >= function["ts"] + function["dur"]
    assert names(trace, "process_name") == {0: "localhost", 1: "launcher"}
    run = got[0, "run"]  # the launcher's own thread 0: from submit to done
    assert run["dur"] >= got[0, "function"]["dur"]
    first_trace = json.loads((tmp_path / "traces" / f"{first.run_id}.json").read_text())
    assert (-1, "agent start") in spans(first_trace)  # the first run started the agent
    assert (-1, "agent start") not in got


def test_no_trace_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHRUNX_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau:
        lau.run(int)
    assert not list(tmp_path.rglob("*.json"))


def test_a_timeline_across_test_hosts(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHRUNX_TRACE", str(tmp_path))
    hosts = cluster.hostnames[:2]
    launcher = torchrunx.Launcher(
        hostnames=hosts, workers_per_host=1, backend="gloo", ssh_config_file=cluster.ssh_config
    )
    with launcher:
        handle = launcher.submit(nap)
        handle.result(timeout=120)
    trace = json.loads((tmp_path / f"{handle.run_id}.json").read_text())
    assert names(trace, "process_name") == {0: hosts[0], 1: hosts[1], 2: "launcher"}
    got = spans(trace)
    for rank in (0, 1):
        assert {n for t, n in got if t == rank} >= RANK_PHASES
