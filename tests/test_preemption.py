"""Preemption: a real signal to the launcher, an agent or every process of a host is one notice
for every rank; the ranks get a grace to return; run() raises PreemptedError; nothing is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import torchrunx

if TYPE_CHECKING:
    from pathlib import Path

    from testbed.cluster import Cluster

NOTICE_BOUND_S = 1.0  # from the signal to every rank's preempted()


def until_preempted(limit: float = 30.0) -> dict[str, Any]:
    """A rank's loop: steps until its notice, then it returns (when, and its step)."""
    start, step = time.time(), 0
    while not torchrunx.preempted():
        if time.time() - start > limit:
            return {"noticed": None, "step": step, "rank": int(os.environ["RANK"])}
        time.sleep(0.001)
        step += 1
    return {"noticed": time.time(), "step": step, "rank": int(os.environ["RANK"])}


def stubborn_rank_1(limit: float = 60.0) -> dict[str, Any]:
    """Rank 0 returns at its notice; rank 1 goes on as if there were none."""
    if os.environ["RANK"] == "1":
        time.sleep(limit)
    return until_preempted(limit)


def agent_pids(launcher: torchrunx.Launcher) -> list[int]:
    assert launcher._pool is not None
    return [a.process.pid for a in launcher._pool.agents if a is not None]


def wait_running(handle: torchrunx.RunHandle[Any], ranks: int, timeout: float = 30.0) -> None:
    """Until every rank is in the function (its notice handling is in place)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = handle.status(timeout=2)
        if len(states) == ranks and all(s.state == "running" for s in states.values()):
            time.sleep(0.2)  # in the function, past its first preempted()
            return
        time.sleep(0.05)
    pytest.fail("the ranks did not start running")


def two_agents(**fields: Any) -> torchrunx.Launcher:
    return torchrunx.Launcher(
        hostnames=["localhost", "127.0.0.1"], workers_per_host=1, backend="gloo", **fields
    )


def test_preempted_is_false_without_a_notice(launcher: torchrunx.Launcher) -> None:
    assert launcher.run(torchrunx.preempted).by_rank() == [False, False]
    assert not torchrunx.preempted()  # not a worker


def test_a_signal_to_one_agent_reaches_every_rank_and_run_raises(tmp_path: Path) -> None:
    with two_agents() as lau:
        handle = lau.submit(until_preempted)
        wait_running(handle, 2)
        sent = time.time()
        os.kill(agent_pids(lau)[1], signal.SIGTERM)
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
        error = info.value
        assert error.signals == {"127.0.0.1": "SIGTERM"}
        assert sorted(error.partial_results) == [0, 1]  # both returned within the grace
        for value in error.partial_results.values():
            assert 0 <= value["noticed"] - sent < NOTICE_BOUND_S
        assert "SIGTERM on 127.0.0.1" in str(error)
        assert "2 of 2 ranks returned" in str(error)
        assert all(psutil.pid_exists(p) for p in agent_pids(lau))  # the agent lives on

        # a run started after the notice sees it at once, and is preempted too
        with pytest.raises(torchrunx.PreemptedError) as later:
            lau.run(torchrunx.preempted)
        assert later.value.partial_results == {0: True, 1: True}


def test_a_signal_to_every_process_of_a_host_kills_none_of_them() -> None:
    with two_agents() as lau:
        handle = lau.submit(until_preempted)
        wait_running(handle, 2)
        agent = psutil.Process(agent_pids(lau)[0])
        everyone = [agent, *agent.children(recursive=True)]  # forkservers, workers: as SLURM does
        assert len(everyone) >= 3
        for p in everyone:
            p.send_signal(signal.SIGTERM)
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
        assert info.value.signals == {"localhost": "SIGTERM"}
        assert sorted(info.value.partial_results) == [0, 1]  # no rank died of it
        assert agent.is_running()


def test_the_grace_ends_for_a_rank_that_ignores_the_notice() -> None:
    with two_agents(preempt_grace=1.5) as lau:
        handle = lau.submit(stubborn_rank_1)
        wait_running(handle, 2)
        sent = time.monotonic()
        os.kill(agent_pids(lau)[0], signal.SIGTERM)
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
        took = time.monotonic() - sent
        error = info.value
        assert 1.5 <= took < 1.5 + 3, took
        assert list(error.partial_results) == [0]
        assert "rank 1 did not and was torn down (the grace of 1.5 s ended)" in str(error)
        assert "in stubborn_rank_1" in error.stacks[1]  # where it was, as in any autopsy
        assert "rank 1: stubborn_rank_1 (tests/test_preemption.py:" in "\n".join(error.__notes__)


def test_a_second_signal_ends_the_grace_at_once() -> None:
    with two_agents(preempt_grace=60) as lau:
        handle = lau.submit(stubborn_rank_1)
        wait_running(handle, 2)
        agent = agent_pids(lau)[1]
        os.kill(agent, signal.SIGTERM)
        time.sleep(0.5)
        second = time.monotonic()
        os.kill(agent, signal.SIGTERM)
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
        assert time.monotonic() - second < 1.0
        assert list(info.value.partial_results) == [0]
        assert "a second SIGTERM on 127.0.0.1 ended the grace" in str(info.value)


def test_ranks_agree_on_the_step_at_which_they_stop() -> None:
    def steps() -> int:
        step = 0
        while not torchrunx.preempted(agree=True):  # a collective: every rank, every step
            time.sleep(0.005 * (1 + int(os.environ["RANK"])))
            step += 1
            if step > 5000:
                return -1
        return step

    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=3, backend="gloo") as lau:
        handle = lau.submit(steps)
        wait_running(handle, 3)
        # only rank 2 hears of it (its own signal): the others learn it from the collective
        os.kill(handle.status()[2].pid or 0, signal.SIGTERM)
        stopped = handle.result(timeout=30).by_rank()
    assert len(set(stopped)) == 1
    assert stopped[0] > 0


SCRIPT = """
    import json, os, sys, time
    import torchrunx

    def train(path):
        step = 0
        while not torchrunx.preempted():
            time.sleep(0.01)
            step += 1
        print(f"rank {os.environ['RANK']} stops at step {step}", flush=True)
        return {"noticed": time.time(), "step": step}

    if __name__ == "__main__":
        launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo")
        try:
            launcher.run(train, sys.argv[1])
        except torchrunx.PreemptedError as e:
            print(json.dumps({"signals": e.signals, "results": e.partial_results}), flush=True)
            launcher.close()
            sys.exit(0)
        sys.exit(3)
"""


def test_a_script_signalled_from_outside_exits_0_through_its_except(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TORCHRUNX_LOG_DIR": str(logs)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # its workers are up, in the function
            if len(list(psutil.Process(proc.pid).children(recursive=True))) >= 4:
                break
            time.sleep(0.1)
        time.sleep(2.0)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)  # what kill -TERM <launcher> does
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["signals"] == {"launcher": "SIGTERM"}
    assert sorted(report["results"]) == ["0", "1"]
    for value in report["results"].values():
        assert 0 <= value["noticed"] - sent < NOTICE_BOUND_S
    # every line written before the end is in the logs
    (folder,) = logs.iterdir()
    text = "\n".join(f.read_text() for f in folder.iterdir())
    assert "rank 0 stops at step" in text
    assert "rank 1 stops at step" in text


def test_preemption_fields_are_checked_when_the_launcher_is_made() -> None:
    with pytest.raises(ValueError, match="'SIGNOPE' is not a signal's name"):
        torchrunx.Launcher(preempt_signals=("SIGNOPE",))
    with pytest.raises(ValueError, match="SIGKILL cannot be a preemption notice"):
        torchrunx.Launcher(preempt_signals=("SIGTERM", "SIGKILL"))
    with pytest.raises(ValueError, match="SIGINT cannot"):
        torchrunx.Launcher(preempt_signals=("SIGINT",))
    with pytest.raises(TypeError, match="preempt_signals='SIGTERM'"):
        torchrunx.Launcher(preempt_signals="SIGTERM")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preempt_grace=-1"):
        torchrunx.Launcher(preempt_grace=-1)
    with pytest.raises(TypeError, match="requeue='yes'"):
        torchrunx.Launcher(requeue="yes")  # type: ignore[arg-type]
    torchrunx.Launcher(preempt_signals=("SIGUSR1", "SIGTERM"), preempt_grace=0, requeue=True)


def test_without_preempt_signals_sigterm_ends_the_agent_as_before() -> None:
    with two_agents(preempt_signals=()) as lau:
        handle = lau.submit(until_preempted, 10)
        wait_running(handle, 2)
        os.kill(agent_pids(lau)[1], signal.SIGTERM)
        with pytest.raises(torchrunx.AgentFailedError, match=r"127\.0\.0\.1"):
            handle.result(timeout=30)


def test_a_notice_reaches_the_ranks_of_a_second_test_host(cluster: Cluster) -> None:
    hosts = cluster.hostnames[:2]
    with torchrunx.Launcher(
        hostnames=hosts, workers_per_host=2, ssh_config_file=cluster.ssh_config
    ) as lau:
        handle = lau.submit(until_preempted)
        wait_running(handle, 4)
        assert lau._pool is not None
        first = lau._pool.agents[0]
        assert first is not None
        assert first.facts is not None
        sent = time.time()
        threading.Thread(target=os.kill, args=(first.facts.pid, signal.SIGTERM)).start()
        with pytest.raises(torchrunx.PreemptedError) as info:
            handle.result(timeout=30)
    assert info.value.signals == {hosts[0]: "SIGTERM"}
    assert cluster.wait_no_processes() == []  # nothing of the run (nor the agents) is left
    results = info.value.partial_results
    assert sorted(results) == [0, 1, 2, 3]
    for value in results.values():  # the second host's ranks too (one clock: the same machine)
        assert 0 <= value["noticed"] - sent < NOTICE_BOUND_S


def _sleep_long() -> None:
    time.sleep(60)


def fork_and_terminate() -> int | None:
    """A child the rank forks takes SIGTERM as it would without torchrunx: terminate() ends it."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_sleep_long)
    child.start()
    time.sleep(0.2)
    child.terminate()
    child.join(timeout=10)
    if child.exitcode is None:
        child.kill()
    return child.exitcode


def test_children_a_rank_forks_keep_sigterm_as_it_is(launcher: torchrunx.Launcher) -> None:
    assert launcher.run(fork_and_terminate).by_rank() == [-signal.SIGTERM, -signal.SIGTERM]
