"""Restarts on warm agents: a failed run runs again on fresh workers, the handle stays the same."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import torchrunx


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
