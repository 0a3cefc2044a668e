"""Runs in the background: submit, several at once, cancel one, views of a launcher."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def pool() -> Iterator[torchrunx.Launcher]:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        yield lau


def serve(folder: str) -> int:
    """Rank 0 answers `x` with `2x` on a TCP port until it reads `stop`."""
    if os.environ["RANK"] != "0":
        return 0
    answered = 0
    with socket.create_server(("127.0.0.1", 0)) as server:
        Path(folder, "port").write_text(str(server.getsockname()[1]))
        while True:
            conn, _ = server.accept()
            with conn:
                request = conn.recv(64).decode()
                if request == "stop":
                    return answered
                conn.sendall(str(2 * int(request)).encode())
                answered += 1


def ask(port: int, x: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(str(x).encode())
        return int(conn.recv(64).decode())


def wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)
    return path.read_text()


def test_background_server_answers_foreground_runs(
    pool: torchrunx.Launcher, tmp_path: Path
) -> None:
    server = pool.view(workers_per_host=1).submit(serve, str(tmp_path))
    port = int(wait_for(tmp_path / "port"))
    assert not server.done()
    for x in range(3):
        assert pool.run(ask, port, x).by_rank() == [2 * x, 2 * x]
    assert pool.view(workers_per_host=1).run(ask, port, 5).rank(0) == 10
    ask_stop = socket.create_connection(("127.0.0.1", port), timeout=10)
    ask_stop.sendall(b"stop")
    ask_stop.close()
    assert server.result(timeout=30).rank(0) == 7  # 3 runs of 2 ranks, and one of 1


def own_group_sum(value: float, rounds: int) -> tuple[str, float]:
    t = torch.tensor([value])
    for _ in range(rounds):
        t = torch.tensor([value])
        dist.all_reduce(t)
    return os.environ["TORCHRUNX_RUN_ID"], t.item()


def test_eight_runs_at_once_each_with_its_own_group(pool: torchrunx.Launcher) -> None:
    handles = {v: pool.submit(own_group_sum, float(v), 20) for v in range(8)}
    assert all(isinstance(h, concurrent.futures.Future) for h in handles.values())
    done, not_done = concurrent.futures.wait(handles.values(), timeout=120)
    assert not not_done
    assert len(done) == 8
    for v, handle in handles.items():
        assert handle.result().by_rank() == [(handle.run_id, 2.0 * v)] * 2


def sleep_and_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_cancel_one_of_three(pool: torchrunx.Launcher) -> None:
    short, long, other = (pool.submit(sleep_and_return, s) for s in (0.5, 300, 1.0))
    start = time.monotonic()
    assert long.cancel()
    assert time.monotonic() - start < 10
    assert long.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        long.result()
    assert [h.result(timeout=60).rank(0) for h in (short, other)] == [0.5, 1.0]
    assert not short.cancel()  # done already


def fail_if(*, fail: bool) -> str:
    if fail:
        msg = "this run fails"
        raise ValueError(msg)
    time.sleep(0.5)
    return "fine"


def test_failure_of_one_run_leaves_the_other_alone(pool: torchrunx.Launcher) -> None:
    bad, good = pool.submit(fail_if, fail=True), pool.submit(fail_if, fail=False)
    finished = []
    for handle in (bad, good):
        handle.add_done_callback(finished.append)
    ordered = list(concurrent.futures.as_completed([bad, good], timeout=60))
    assert set(ordered) == {bad, good}
    assert isinstance(bad.exception(), ValueError)
    with pytest.raises(ValueError, match="this run fails"):
        bad.result()
    assert good.result().by_rank() == ["fine", "fine"]
    assert set(finished) == {bad, good}


def test_close_with_runs_in_flight_cancels_them() -> None:
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo")
    handles = [launcher.submit(sleep_and_return, 300) for _ in range(2)]
    time.sleep(1)
    launcher.close()
    assert all(h.cancelled() for h in handles)


def test_views_choose_fewer_workers_and_check_their_hosts(pool: torchrunx.Launcher) -> None:
    assert pool.view(workers_per_host=1).run(os.getpid).by_hostname().keys() == {"localhost"}
    assert len(pool.view(workers_per_host=1).run(os.getpid)) == 1
    assert len(pool.view(workers_per_host=3).run(os.getpid)) == 3
    with pytest.raises(ValueError, match="node9"):
        pool.view(hostnames=["node9"])
    with pytest.raises(ValueError, match="workers_per_host"):
        pool.view(workers_per_host=0)
