"""Sweeps: many runs side by side on one warm launcher, each on cores (or GPUs) of its own."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect
import psutil
import pytest
import torch

import torchrunx
from torchrunx.placement import core_groups

if TYPE_CHECKING:
    from testbed.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]


def where_it_ran(item: int, folder: str, seconds: float = 0.4) -> dict[str, Any]:
    """A run's function: when it was in the function, on which cores, with which variables."""
    entered = time.time()
    time.sleep(seconds)
    record = {
        "item": item,
        "entered": entered,
        "left": time.time(),
        "cores": sorted(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "local_rank": os.environ["LOCAL_RANK"],
        "world": os.environ["WORLD_SIZE"],
        "pid": os.getpid(),
    }
    Path(folder, f"{item}-{os.environ['RANK']}.json").write_text(json.dumps(record))
    return record


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_runs_go_side_by_side_on_cores_of_their_own(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="") as launcher:
        sweep = launcher.sweep(
            functools.partial(where_it_ran, folder=str(tmp_path)), range(6), progress=False
        )
        outcomes = sweep.outcomes()
    assert [item for item, _ in outcomes] == list(range(6))
    assert all(isinstance(o, torchrunx.LaunchResult) for _, o in outcomes)
    runs = records(tmp_path)
    assert sorted(r["item"] for r in runs) == list(range(6))
    assert sweep.most_in_flight == 2  # the capacity, reached and never passed
    assert most_at_once([(r["entered"], r["left"]) for r in runs]) == 2
    groups = core_groups(cores, 2)
    for r in runs:
        assert r["local_rank"] == "0"
        assert r["world"] == "1"
        assert r["cores"] in groups  # a slot's cores, nothing else
        assert r["threads"] == len(r["cores"])
        assert r["omp"] == str(len(r["cores"]))
    for a in runs:  # runs at the same time never share a core
        for b in runs:
            overlap = a["entered"] < b["left"] and b["entered"] < a["left"]
            if a is not b and overlap:
                assert not set(a["cores"]) & set(b["cores"]), (a, b)


def failing_item(item: int) -> int:
    if item == 1:
        msg = "CUDA out of memory. Tried to allocate 20.00 GiB"
        raise torch.OutOfMemoryError(msg)
    if item == 2:
        raise ValueError("bad learning rate 2")
    if item == 3:
        os._exit(3)
    time.sleep(0.2)
    return item * 10


def test_errors_are_outcomes_and_the_rest_finish() -> None:
    with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="") as launcher:
        outcomes = dict(launcher.sweep(failing_item, range(6), progress=False).outcomes())
    assert isinstance(outcomes[1], torch.OutOfMemoryError)
    assert "20.00 GiB" in str(outcomes[1])
    assert isinstance(outcomes[2], ValueError)
    assert isinstance(outcomes[3], torchrunx.WorkerFailedError)
    assert [outcomes[i].by_rank() for i in (0, 4, 5)] == [[0], [40], [50]]  # type: ignore[union-attr]


def sleep_then_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_iteration_is_in_the_order_runs_end_and_outcomes_in_the_items_order() -> None:
    items = [4.0, 0.1, 0.8, 0.1]
    with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="") as launcher:
        sweep = launcher.sweep(sleep_then_return, items, progress=False)
        ended = [item for item, _ in sweep]
        ordered = sweep.outcomes()
    assert ended.index(0.1) < ended.index(4.0)  # the short ones first
    assert ended[-1] == 4.0
    assert [(i, o.by_rank()) for i, o in ordered] == [(i, [i]) for i in items]  # type: ignore[union-attr]


def test_two_ranks_per_run_get_two_slots_of_one_host(tmp_path: Path) -> None:
    with torchrunx.Launcher(workers_per_host=2, backend="gloo", log_dir="") as launcher:
        outcomes = launcher.sweep(
            functools.partial(where_it_ran, folder=str(tmp_path)), range(2), 2
        ).outcomes()
    assert all(isinstance(o, torchrunx.LaunchResult) for _, o in outcomes)
    runs = records(tmp_path)
    assert sorted((r["item"], r["local_rank"], r["world"]) for r in runs) == [
        (0, "0", "2"), (0, "1", "2"), (1, "0", "2"), (1, "1", "2"),
    ]  # fmt: skip
    assert most_at_once([(r["entered"], r["left"]) for r in runs if r["local_rank"] == "0"]) == 1
    assert {tuple(r["cores"]) for r in runs} == {tuple(sorted(os.sched_getaffinity(0)))}


def test_bad_calls_fail_before_any_run() -> None:
    launcher = torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="")
    try:
        with pytest.raises(ValueError, match=r"sweep\(workers=3\).*from 1 to 2"):
            launcher.sweep(sleep_then_return, [1], workers=3)
        with pytest.raises(ValueError, match=r"sweep\(workers=0\)"):
            launcher.sweep(sleep_then_return, [1], workers=0)
        with pytest.raises(ValueError, match="one item or more"):
            launcher.sweep(sleep_then_return, [])
        with pytest.raises(TypeError, match="cannot be called with these arguments"):
            launcher.sweep(lambda a, b: a + b, [1])  # type: ignore[arg-type, misc]
    finally:
        launcher.close()


def test_close_runs_no_more_and_what_ran_finishes() -> None:
    with torchrunx.Launcher(workers_per_host=1, backend=None, log_dir="") as launcher:
        sweep = launcher.sweep(sleep_then_return, [0.8, 0.1, 0.1], progress=False)
        deadline = time.monotonic() + 30
        while not sweep.status() and time.monotonic() < deadline:
            time.sleep(0.01)
        (running,) = sweep.status()
        assert (running.item, running.hostname, running.slots) == (0.8, "localhost", (0,))
        assert "#0 0.8 on localhost [0]" in str(running)
        sweep.close()
        outcomes = sweep.outcomes()
    assert outcomes[0][1].by_rank() == [0.8]  # type: ignore[union-attr]
    for _, outcome in outcomes[1:]:
        assert isinstance(outcome, torchrunx.NotRunError)
        assert outcome.reason == "closed"


def test_the_live_view_names_the_item_of_each_line(capfd: pytest.CaptureFixture[str]) -> None:
    def shout(item: str) -> None:
        print(f"hello from {item}", flush=True)

    with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="") as launcher:
        launcher.sweep(shout, ["a", "b"], progress=False).outcomes()
    out = capfd.readouterr().out
    assert "[#0 localhost:0] hello from a" in out
    assert "[#1 localhost:0] hello from b" in out


def fails_on_first_attempt(folder: str) -> int:
    marker = Path(folder, "tried")
    if not marker.exists():
        marker.write_text("1")
        os._exit(1)
    return int(os.environ["TORCHRUNX_RESTART_COUNT"])


def test_restarts_apply_per_run(tmp_path: Path) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    for f in folders:
        f.mkdir()
    with torchrunx.Launcher(
        workers_per_host=2, backend=None, log_dir="", max_restarts=1
    ) as launcher:
        outcomes = launcher.sweep(fails_on_first_attempt, [str(f) for f in folders]).outcomes()
    for _, outcome in outcomes:
        assert outcome.by_rank() == [1]  # type: ignore[union-attr]
        assert len(outcome.restarts) == 1  # type: ignore[union-attr]


def until_preempted(_item: int) -> str:
    deadline = time.time() + 30
    while not torchrunx.preempted() and time.time() < deadline:
        time.sleep(0.01)
    return "checkpointed" if torchrunx.preempted() else "no notice"


def test_a_preemption_notice_stops_the_sweep() -> None:
    with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="") as launcher:
        sweep = launcher.sweep(until_preempted, range(5), progress=False)
        deadline = time.monotonic() + 30
        while len(sweep.status()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # in the function
        assert launcher._pool is not None
        agent = next(a for a in launcher._pool.agents if a is not None)
        os.kill(agent.process.pid, signal.SIGTERM)
        outcomes = sweep.outcomes()
    preempted = [o for _, o in outcomes if isinstance(o, torchrunx.PreemptedError)]
    assert len(preempted) == 2
    assert all(o.partial_results == {0: "checkpointed"} for o in preempted)
    not_run = [o for _, o in outcomes if isinstance(o, torchrunx.NotRunError)]
    assert len(not_run) == 3
    assert all(o.reason == "preempted" for o in not_run)


SCRIPT = """
import os, sys, time
from pathlib import Path
import torchrunx

OUT = sys.argv[1]

def long(item):
    Path(OUT, f"pid{item}").write_text(str(os.getpid()))
    time.sleep(60)

launcher = torchrunx.Launcher(workers_per_host=2, backend=None, log_dir="")
try:
    for item, outcome in launcher.sweep(long, range(4)):
        print("ended", item, outcome)
finally:
    launcher.close()
"""


def test_ctrl_c_cancels_the_sweep_with_where_its_runs_were(tmp_path: Path) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(SCRIPT))
    child = pexpect.spawn(
        sys.executable, [str(script), str(tmp_path)], cwd=str(tmp_path), timeout=60,
        encoding="utf-8", env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    child.logfile_read = sys.stdout
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid*"))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
        child.sendintr()
        child.expect(r"torchrunx: #\d 0?\d on localhost \[\d\], [\d.]+ s cancelled; its ranks")
        child.expect(r"long \(\S*sweep.py:10\)")
        child.expect("KeyboardInterrupt")
        child.expect(pexpect.EOF)
        assert "ended" not in str(child.before)
        assert "_next_ended" not in str(child.before)  # no frame of ours but the one raising
        assert not [p for p in pids if psutil.pid_exists(p)]
        assert len(list(tmp_path.glob("pid*"))) == 2  # the queued never started
    finally:
        child.close(force=True)


def hostname_of(_item: int) -> str:
    time.sleep(0.3)
    return socket.gethostname()


def test_a_sweep_spreads_over_the_test_hosts(cluster: Cluster) -> None:
    with torchrunx.Launcher(
        hostnames=cluster.hostnames[:2],
        workers_per_host=1,
        backend=None,
        ssh_config_file=cluster.ssh_config,
        log_dir="",
    ) as launcher:
        sweep = launcher.sweep(hostname_of, range(4), progress=False)
        outcomes = sweep.outcomes()
    names = [o.by_rank()[0] for _, o in outcomes]  # type: ignore[union-attr]
    assert sorted(names) == sorted(cluster.hostnames[:2] * 2)
    assert sweep.most_in_flight == 2


def test_without_a_terminal_a_line_per_item(tmp_path: Path) -> None:
    script = tmp_path / "lines.py"
    script.write_text(
        "import torchrunx\n"
        "with torchrunx.Launcher(workers_per_host=2, backend=None, log_dir='') as launcher:\n"
        "    launcher.sweep(abs, [-1, -2, 'x']).outcomes()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    err = done.stderr
    lines = [line for line in err.splitlines() if line.startswith("torchrunx sweep:")]
    assert len(lines) == 3, err
    assert lines[-1].startswith("torchrunx sweep: 3/3 done (1 failed, 0 running)")
    assert any("#2 'x' on localhost" in line and "TypeError" in line for line in lines)


def test_closing_the_launcher_ends_its_sweeps() -> None:
    launcher = torchrunx.Launcher(workers_per_host=1, backend=None, log_dir="")
    sweep = launcher.sweep(sleep_then_return, [5.0, 0.1, 0.1], progress=False)
    deadline = time.monotonic() + 30
    while not sweep.status() and time.monotonic() < deadline:
        time.sleep(0.01)
    launcher.close()
    outcomes = [o for _, o in sweep.outcomes()]
    assert isinstance(outcomes[0], BaseException)  # torn down with the agents
    assert [type(o) for o in outcomes[1:]] == [torchrunx.NotRunError] * 2
    assert launcher._pool is None  # no run of the sweep started the agents again
