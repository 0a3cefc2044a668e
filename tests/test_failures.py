"""The failure matrix: every way a run can end badly ends in the right exception, fast, cleanly."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import psutil
import pytest
import torch.distributed as dist

import torchrunx
from torchrunx.errors import RemoteTraceback


class CustomError(Exception):
    pass


def on_rank(rank: int, action: str) -> int:  # noqa: C901 -- one branch per way to fail
    """Rank ``rank`` does ``action``; the others wait in a barrier (they never get out)."""
    if int(os.environ["RANK"]) == rank:
        print(f"about to {action}", flush=True)
        if action == "raise":
            raise CustomError("bad config 42")
        if action == "value_error":
            raise ValueError("bad value 7")
        if action == "sys_exit":
            sys.exit(1)
        if action == "os_exit":
            os._exit(3)
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "segfault":
            ctypes.string_at(0)
        if action == "unpicklable_result":
            return threading.Lock()  # type: ignore[return-value]
        if action == "unpicklable_error":
            lock = threading.Lock()

            class UnpicklableError(Exception):
                def __reduce__(self) -> object:
                    return (type(lock), ())

            raise UnpicklableError("cannot travel")
    dist.barrier()
    return 0


def assert_run_fails(
    launcher: torchrunx.Launcher, action: str, error: type[BaseException], rank: int = 1
) -> BaseException:
    start = time.monotonic()
    with pytest.raises(error) as info:
        launcher.run(on_rank, rank, action)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"{action}: took {elapsed:.1f} s"
    # the same launcher runs the next function normally
    assert launcher.run(lambda: 5).by_rank() == [5, 5]
    return info.value


def test_user_exception_keeps_its_type_with_remote_traceback(launcher: torchrunx.Launcher) -> None:
    e = assert_run_fails(launcher, "raise", CustomError)
    assert str(e) == "bad config 42"
    assert isinstance(e.__cause__, RemoteTraceback)
    assert "on_rank" in str(e.__cause__)
    assert any("rank 1" in n and "localhost" in n for n in e.__notes__)


def test_value_error_while_peer_waits_in_barrier(launcher: torchrunx.Launcher) -> None:
    start = time.monotonic()
    e = assert_run_fails(launcher, "value_error", ValueError, rank=0)
    assert "bad value 7" in str(e)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("sys_exit", "exited with code 1"),
        ("os_exit", "exited with code 3"),
        ("sigkill", "SIGKILL"),
        ("segfault", "SIGSEGV"),
    ],
)
def test_worker_death(launcher: torchrunx.Launcher, action: str, expected: str) -> None:
    e = assert_run_fails(launcher, action, torchrunx.WorkerFailedError)
    assert isinstance(e, torchrunx.WorkerFailedError)
    text = str(e)
    assert expected in text
    assert "rank 1" in text
    assert "localhost" in text
    assert f"about to {action}" in text  # the last lines it wrote
    assert e.rank == 1


def test_unpicklable_result_names_rank_and_type(launcher: torchrunx.Launcher) -> None:
    e = assert_run_fails(launcher, "unpicklable_result", torchrunx.WorkerFailedError)
    assert "rank 1" in str(e)
    assert "lock" in str(e).lower()


def test_unpicklable_exception_names_rank_and_type(launcher: torchrunx.Launcher) -> None:
    e = assert_run_fails(launcher, "unpicklable_error", torchrunx.WorkerFailedError)
    assert "Unpicklable" in str(e)
    assert "cannot travel" in str(e)
    assert "rank 1" in str(e)


def test_failure_on_every_rank_raises_one_of_them(launcher: torchrunx.Launcher) -> None:
    def both() -> None:
        msg = f"rank{os.environ['RANK']}"
        raise KeyError(msg)

    with pytest.raises(KeyError) as info:
        launcher.run(both)
    rank = str(info.value).strip("'")[-1]
    assert f"raised by rank {rank} " in info.value.__notes__[0]
    # the other rank is summarised when its error got out before the teardown reached it
    other = "1" if rank == "0" else "0"
    for note in info.value.__notes__[1:]:
        assert f"rank {other}" in note


def test_the_cause_comes_first_and_the_rest_is_summarised() -> None:
    from torchrunx.outcome import Evidence, WorkerDied, WorkerRaised, resolve
    from torchrunx.transport.messages import Died, Raised, decode, encode

    # as they arrive: encoded by the agent, decoded by the launcher
    raised, frames = decode(
        encode(
            Raised(
                run="r",
                rank=0,
                local_rank=0,
                type="builtins.RuntimeError",
                message="Connection closed by peer",
                traceback="...",
                unpicklable="no pickle here",
            )
        )
    )
    died, _ = decode(
        encode(Died(run="r", rank=1, local_rank=1, pid=9, tail=("last words",), signal="SIGKILL"))
    )
    assert isinstance(raised, Raised)
    assert isinstance(died, Died)
    failures = [WorkerRaised("h", raised, frames), WorkerDied("h", died)]
    with pytest.raises(torchrunx.WorkerFailedError) as info:
        resolve(failures, {}, ["h"], [2], Evidence())
    assert "SIGKILL" in str(info.value)
    assert "last words" in str(info.value)
    assert info.value.rank == 1
    assert "rank 0 (local rank 0) on h raised builtins.RuntimeError" in info.value.__notes__[0]


def test_killed_agent_raises_agent_failed_and_next_run_restarts_it() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        lau.run(os.getpid)
        assert lau._pool is not None
        agent = lau._pool.agents[0]
        assert agent is not None
        agent_pid = agent.process.pid
        assert psutil.Process(agent_pid).cmdline()[-2:] == ["-m", "torchrunx.agent"]

        def kill_agent_then_wait(pid: int) -> None:
            if os.environ["RANK"] == "0":
                os.kill(pid, signal.SIGKILL)
            time.sleep(30)

        start = time.monotonic()
        with pytest.raises(torchrunx.AgentFailedError) as info:
            lau.run(kill_agent_then_wait, agent_pid)
        assert time.monotonic() - start < 5
        assert "localhost" in str(info.value)
        assert "SIGKILL" in str(info.value)
        assert lau.run(lambda: 1).by_rank() == [1, 1]


def test_agent_that_cannot_start_gives_a_clear_error(tmp_path: object) -> None:
    lau = torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=1,
        extra_env_vars={
            "PYTHONPATH": "/nonexistent",
            "PYTHONSAFEPATH": "1",
            "PYTHONNOUSERSITE": "1",
            "PYTHONHOME": "/nonexistent",
        },
    )
    with pytest.raises(torchrunx.AgentFailedError) as info:
        lau.run(os.getpid)
    lau.close()
    assert "localhost" in str(info.value)
    assert str(info.value).strip()


def _raises_value_error() -> None:
    raise ValueError("boom")


def test_the_traceback_in_the_launcher_is_the_run_call_and_one_frame_of_ours(
    launcher: torchrunx.Launcher,
) -> None:
    import traceback

    with pytest.raises(ValueError, match="boom") as info:
        launcher.run(_raises_value_error)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[0].filename == __file__  # the run() line
    assert len([f for f in frames if f"{os.sep}torchrunx{os.sep}" in f.filename]) <= 1
    assert "concurrent" not in "".join(f.filename for f in frames)
    assert 'in _raises_value_error\n    raise ValueError("boom")' in str(info.value.__cause__)
