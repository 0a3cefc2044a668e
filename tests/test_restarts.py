"""Restarts on warm agents: a failed run runs again on fresh workers, the handle stays the same."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import torchrunx

if TYPE_CHECKING:
    from testbed.cluster import Cluster


def attempt() -> int:
    return int(os.environ["TORCHRUNX_RESTART_COUNT"])


def die_until(attempts: int, how: str = "sigkill") -> dict[str, Any]:
    """Rank 1 fails on the first ``attempts`` attempts; then every rank returns its attempt."""
    if attempt() < attempts and os.environ["RANK"] == "1":
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        msg = f"bad value on attempt {attempt()}"
        raise ValueError(msg)
    return {
        "attempt": attempt(),
        "elastic": os.environ["TORCHELASTIC_RESTART_COUNT"],
        "max": os.environ["TORCHELASTIC_MAX_RESTARTS"],
        "run_id": os.environ["TORCHRUNX_RUN_ID"],
        "entered": time.time(),
    }


def count_calls(folder: str) -> int:
    """Leaves a file per call of each rank; rank 1 always raises."""
    Path(folder, f"{os.environ['RANK']}-{attempt()}").touch()
    if os.environ["RANK"] == "1":
        raise ValueError("always")
    return attempt()


def local(**fields: Any) -> torchrunx.Launcher:
    return torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo", **fields)


def test_a_rank_killed_on_the_first_attempt_is_restarted_on_fresh_workers() -> None:
    with local(max_restarts=2) as lau:
        handle = lau.submit(die_until, 1)
        result = handle.result(timeout=60)
    values = result.by_rank()
    assert [v["attempt"] for v in values] == [1, 1]
    assert [(v["elastic"], v["max"]) for v in values] == [("1", "2"), ("1", "2")]
    assert {v["run_id"] for v in values} == {handle.run_id}  # the same run, the same handle
    (earlier,) = result.restarts
    assert isinstance(earlier, torchrunx.WorkerFailedError)
    assert "SIGKILL" in str(earlier)


def test_an_exception_of_the_function_is_not_restarted(tmp_path: Path) -> None:
    with local(max_restarts=3) as lau, pytest.raises(ValueError, match="always") as info:
        lau.run(count_calls, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-0", "1-0"]  # one attempt only
    assert not getattr(info.value, "restarts", [])


def test_an_exception_named_in_restart_on_is_restarted() -> None:
    with local(max_restarts=1, restart_on=(ValueError,)) as lau:
        result = lau.run(die_until, 1, "raise")
    assert [v["attempt"] for v in result.by_rank()] == [1, 1]
    assert [type(e) for e in result.restarts] == [ValueError]


def test_when_every_attempt_fails_the_last_one_is_raised_with_the_earlier() -> None:
    with local(max_restarts=2) as lau, pytest.raises(torchrunx.WorkerFailedError) as info:
        lau.run(die_until, 5)
    error = info.value
    assert "attempt 3 of 3" in "\n".join(error.__notes__)
    assert len(error.restarts) == 2  # type: ignore[attr-defined]
    assert all(isinstance(e, torchrunx.WorkerFailedError) for e in error.restarts)  # type: ignore[attr-defined]


def slow_first_attempt(seconds: float = 30) -> int:
    if attempt() == 0:
        time.sleep(seconds)
    return attempt()


def test_a_killed_agent_is_started_again_within_the_attempts() -> None:
    with local(max_restarts=1) as lau:
        handle = lau.submit(slow_first_attempt)
        time.sleep(1.5)
        assert lau._pool is not None
        (agent,) = lau._pool.agents
        assert agent is not None
        os.kill(agent.process.pid, signal.SIGKILL)
        result = handle.result(timeout=60)
        (again,) = lau._pool.agents
        assert again is not None
        assert again.process.pid != agent.process.pid
    assert result.by_rank() == [1, 1]
    (earlier,) = result.restarts
    assert isinstance(earlier, torchrunx.AgentFailedError)
    assert "SIGKILL" in str(earlier)


def test_status_and_trace_show_the_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_TRACE", str(tmp_path))

    def slow_second_attempt() -> int:
        if attempt() == 0 and os.environ["RANK"] == "1":
            os._exit(3)
        time.sleep(3 if attempt() else 0)
        return attempt()

    with local(max_restarts=1) as lau:
        handle = lau.submit(slow_second_attempt)
        deadline = time.monotonic() + 30
        seen: set[int] = set()
        while time.monotonic() < deadline and not handle.done():
            seen |= {s.attempt for s in handle.status().values() if s.state == "running"}
            if 1 in seen:
                break
            time.sleep(0.05)
        assert handle.result(timeout=30).by_rank() == [1, 1]
    assert 1 in seen
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{handle.run_id}.attempt2.json", f"{handle.run_id}.json"]
    trace = json.loads((tmp_path / names[0]).read_text())
    titles = [e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"]
    assert "launcher, attempt 2" in titles


def test_a_preemption_is_never_restarted() -> None:
    def until_preempted() -> int:
        while not torchrunx.preempted():
            time.sleep(0.01)
        return attempt()

    with local(max_restarts=3, preempt_grace=5) as lau:
        handle = lau.submit(until_preempted)
        time.sleep(2)
        assert lau._pool is not None
        agent = lau._pool.agents[0]
        assert agent is not None
        os.kill(agent.process.pid, signal.SIGTERM)
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
    assert info.value.partial_results == {0: 0, 1: 0}


def test_cancel_stops_the_restarts() -> None:
    with local(max_restarts=50) as lau:
        handle = lau.submit(die_until, 1000)
        time.sleep(1.0)
        assert handle.cancel()
        assert handle.cancelled()
        assert lau.run(attempt).by_rank() == [0, 0]  # the agents serve the next run


def test_restart_fields_are_checked_when_the_launcher_is_made() -> None:
    with pytest.raises(ValueError, match="max_restarts=-1"):
        torchrunx.Launcher(max_restarts=-1)
    with pytest.raises(ValueError, match="max_restarts=True"):
        torchrunx.Launcher(max_restarts=True)
    with pytest.raises(TypeError, match=r"restart_on=.*tuple of exception types"):
        torchrunx.Launcher(restart_on=("WorkerFailedError",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat_timeout=0"):
        torchrunx.Launcher(heartbeat_timeout=0)


def sleep_then_host(seconds: float) -> str:
    if attempt() == 0:
        time.sleep(seconds)
    return _hostname()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def on_hosts(cluster: Cluster, hosts: list[str], **fields: Any) -> torchrunx.Launcher:
    return torchrunx.Launcher(
        hostnames=hosts, workers_per_host=1, ssh_config_file=cluster.ssh_config, **fields
    )


def test_a_spare_takes_the_ranks_of_a_partitioned_host(cluster: Cluster) -> None:
    hosts = cluster.hostnames[:3]  # the third is the spare
    with on_hosts(cluster, hosts, spares=1, max_restarts=1, heartbeat_timeout=3) as lau:
        assert lau.run(_hostname).by_hostname() == {h: [h] for h in hosts[:2]}  # no ranks: spare
        handle = lau.submit(sleep_then_host, 30)
        time.sleep(1.0)
        cluster.partition(1)
        lost_at = time.monotonic()
        try:
            result = handle.result(timeout=60)
            took = time.monotonic() - lost_at
            assert list(result.by_hostname()) == [hosts[0], hosts[2]]  # same ranks, on the spare
            assert result.by_rank() == [hosts[0], hosts[2]]
            (earlier,) = result.restarts
            assert isinstance(earlier, torchrunx.AgentFailedError)
            assert earlier.hostname == hosts[1]
            assert "heartbeat_timeout" in str(earlier)
            assert took < 3 + 3, took  # found lost within heartbeat_timeout, restarted at once
            # the next runs keep the spare in the lost host's place
            assert lau.run(_hostname).by_rank() == [hosts[0], hosts[2]]
        finally:
            cluster.heal(1)
        # healed, it answers again: a spare now, and our processes there are gone
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert lau._pool is not None
            if lau._pool.roster.spares == [hosts[1]]:
                break
            lau.run(_hostname)  # each run tries the lost host again, in the background
            time.sleep(0.5)
        assert lau._pool is not None
        assert lau._pool.roster.spares == [hosts[1]]


def test_without_a_spare_a_lost_host_is_tried_once_more_then_a_clear_error(
    cluster: Cluster,
) -> None:
    hosts = cluster.hostnames[:2]
    with on_hosts(cluster, hosts, max_restarts=3, heartbeat_timeout=3, agent_timeout=4) as lau:
        handle = lau.submit(sleep_then_host, 30)
        time.sleep(1.0)
        cluster.partition(1)
        try:
            with pytest.raises(torchrunx.AgentFailedError) as info:
                handle.result(timeout=60)
        finally:
            cluster.heal(1)
    error = info.value
    assert error.hostname == hosts[1]
    assert f"{hosts[1]} was lost, and no spare host was left" in "\n".join(error.__notes__)
    assert len(error.restarts) == 1  # type: ignore[attr-defined]  # not every attempt spent
    # the cut-off agent cleared its host when the launcher went silent (agent_timeout)
    assert cluster.wait_no_processes(1, timeout=15) == []


def test_losing_a_host_is_found_within_10_s_by_default(cluster: Cluster) -> None:
    hosts = cluster.hostnames[:2]
    with on_hosts(cluster, hosts) as lau:
        handle = lau.submit(sleep_then_host, 60)
        time.sleep(1.0)
        cluster.partition(1)
        start = time.monotonic()
        try:
            with pytest.raises(torchrunx.AgentFailedError, match="heartbeat_timeout"):
                handle.result(timeout=60)
        finally:
            cluster.heal(1)
        assert time.monotonic() - start < 10 + 2


def test_spares_with_views_and_lists_of_worker_counts() -> None:
    with torchrunx.Launcher(
        hostnames=["localhost", "127.0.0.1"],
        workers_per_host=[2, 1],
        backend="gloo",
        spares=1,
        max_restarts=1,
    ) as lau:
        assert list(lau.run(attempt).by_hostname()) == ["localhost"]  # the spare has no ranks
        assert lau.view().run(attempt).by_hostname() == {"localhost": [0, 0]}
        assert lau.view(["127.0.0.1"], 1).run(attempt).by_hostname() == {"127.0.0.1": [0]}
        handle = lau.submit(slow_first_attempt)
        time.sleep(1.5)
        assert lau._pool is not None
        first = lau._pool.agents[0]
        assert first is not None
        os.kill(first.process.pid, signal.SIGKILL)  # its host is lost: the spare takes its ranks
        result = handle.result(timeout=60)
    assert result.by_hostname() == {"127.0.0.1": [1, 1]}  # localhost's two ranks, on the spare
    assert isinstance(result.restarts[0], torchrunx.AgentFailedError)


def test_a_restart_forks_from_the_forkserver_its_run_had_learned() -> None:
    import psutil

    def imports_json_decoder() -> int:
        import json.decoder  # noqa: F401 -- what the forkserver learns

        if attempt() == 0 and os.environ["RANK"] == "1":
            os._exit(9)
        return os.getppid()

    with local(max_restarts=1) as lau:
        lau.run(imports_json_decoder)  # its ranks' imports are learned, in the background
        time.sleep(3)
        parents = set(lau.run(imports_json_decoder).by_rank())  # both attempts: the same setup
        time.sleep(1)
        assert lau._pool is not None
        (agent,) = lau._pool.agents
        assert agent is not None
        servers = sorted(
            psutil.Process(agent.process.pid).children(), key=lambda p: p.create_time()
        )
    _base, *learned = [s.pid for s in servers]
    assert len(learned) == 1  # one learned forkserver, not one more for each attempt
    assert parents == set(learned)  # the restart forked from it, as the first attempt did
