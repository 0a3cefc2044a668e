"""Lifetimes: nothing of a run outlives it; agents die with the launcher, however it ends."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import torchrunx
from torchrunx.pool import AGENT_GRACE_S
from torchrunx.reaper import alive


def gone(pids: list[int], timeout: float = 0.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        running = alive(pids)
        if not running or time.monotonic() >= deadline:
            return not running
        time.sleep(0.05)


def spawn_children() -> list[int]:
    """A subprocess, a daemonised grandchild that escaped its parent, and DataLoader workers."""
    child = subprocess.Popen(["sleep", "300"])  # noqa: S607 -- from PATH, as user code would
    r, w = os.pipe()
    if os.fork() == 0:  # double fork + setsid: the classic daemon, orphaned at once
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode().ljust(16))
            time.sleep(300)
        os._exit(0)
    daemon = int(os.read(r, 16))
    loader = torch.utils.data.DataLoader(range(100), num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    workers = [w.pid for w in iterator._workers]  # type: ignore[attr-defined]
    return [child.pid, daemon, *workers]


def test_everything_a_run_started_is_gone_when_it_returns(launcher: torchrunx.Launcher) -> None:
    pids = [pid for pids in launcher.run(spawn_children).by_rank() for pid in pids]
    assert len(pids) == 8
    assert gone(pids)


def test_everything_is_gone_when_a_run_fails(launcher: torchrunx.Launcher) -> None:
    def spawn_then_fail(path: str) -> None:
        pids = spawn_children()
        Path(path, os.environ["RANK"]).write_text(" ".join(map(str, pids)))
        if os.environ["RANK"] == "1":
            raise RuntimeError("fail after spawning")
        time.sleep(300)

    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(RuntimeError, match="fail after spawning"):
            launcher.run(spawn_then_fail, d)
        pids = [int(p) for f in Path(d).iterdir() for p in f.read_text().split()]
    assert len(pids) >= 4
    assert gone(pids)


def test_no_temporary_files_pile_up() -> None:
    folders = []
    for _ in range(3):
        with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
            for _ in range(5):
                lau.run(os.getpid)
            assert lau._pool is not None
            folders += [Path(a.facts.dir) for a in lau._pool.agents if a and a.facts]
            assert all(f.is_dir() and f.name.startswith("torchrunx-") for f in folders[-1:])
    assert len(folders) == 3
    assert [f for f in folders if f.exists()] == []


def agent_pids(launcher: torchrunx.Launcher) -> list[int]:
    assert launcher._pool is not None
    return [a.process.pid for a in launcher._pool.agents if a is not None]


def test_garbage_collected_launcher_stops_its_agents() -> None:
    lau = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None)
    lau.run(os.getpid)
    pids = agent_pids(lau)
    forkservers = [c.pid for pid in pids for c in psutil.Process(pid).children()]
    del lau
    gc.collect()
    assert gone(pids + forkservers, timeout=10)


def test_agent_never_imports_torch(launcher: torchrunx.Launcher) -> None:
    launcher.run(os.getpid)
    (pid,) = agent_pids(launcher)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps
    assert psutil.Process(pid).memory_info().rss < 80 * 2**20


SCRIPT = textwrap.dedent("""
    import os, sys, time, torchrunx

    def work(path):
        open(os.path.join(path, "pid." + os.environ["RANK"]), "w").write(str(os.getpid()))
        time.sleep(300)

    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo")
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "exit":
        launcher.run(os.getpid)
        print("done", flush=True)
        sys.exit(0)  # no close(): the exit hook must stop the agents
    try:
        launcher.run(work, path)
    except KeyboardInterrupt:
        print("KeyboardInterrupt raised", flush=True)
        sys.exit(7)
""")


def run_script(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TORCHRUNX_LOG_DIR": ""},
    )


def wait_for_workers(tmp_path: Path, proc: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pid.*"))) < 2:
        assert proc.poll() is None, "the launcher script ended early"
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    return [int(p.read_text()) for p in tmp_path.glob("pid.*")]


def tree(pid: int) -> list[int]:
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


def test_sigkill_of_the_launcher_leaves_nothing_after_5_s(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "kill")
    workers = wait_for_workers(tmp_path, proc)
    everything = tree(proc.pid)
    assert set(workers) <= set(everything)
    proc.kill()
    proc.wait(10)
    assert gone(everything, timeout=5)


def test_ctrl_c_cancels_the_run_and_raises_keyboard_interrupt(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "interrupt")
    workers = wait_for_workers(tmp_path, proc)
    everything = tree(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7
    assert "KeyboardInterrupt raised" in out
    assert gone(everything + workers, timeout=5)


def test_interpreter_exit_stops_the_agents(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "exit")
    deadline = time.monotonic() + 60
    everything: list[int] = []
    while proc.poll() is None and time.monotonic() < deadline:
        everything = list({*everything, *tree(proc.pid)})
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=30)
    assert "done" in out
    assert gone(everything, timeout=5)


def test_close_ends_agents_that_ignore_sigterm_or_are_stopped() -> None:
    # the agents inherit a blocked SIGTERM from the thread that starts them: both ignore it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        lau = torchrunx.Launcher(hostnames=["localhost", "127.0.0.1"], workers_per_host=1)
        lau.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        assert lau._pool is not None
        controller = lau._pool.controller.thread
        stubborn, stopped = pids = agent_pids(lau)
        forkservers = [c.pid for pid in pids for c in psutil.Process(pid).children()]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        os.kill(stopped, signal.SIGSTOP)
        time.sleep(0.5)
        assert alive(pids) == pids  # SIGTERM did nothing
        assert psutil.Process(stopped).status() == psutil.STATUS_STOPPED
    except BaseException:
        lau.close()
        raise

    began = time.monotonic()
    lau.close()
    took = time.monotonic() - began

    assert took < 2 * AGENT_GRACE_S + 2, took
    assert not psutil.pid_exists(stubborn)  # reaped, not only dead
    assert not psutil.pid_exists(stopped)
    assert not controller.is_alive()
    assert gone(forkservers, timeout=5)
