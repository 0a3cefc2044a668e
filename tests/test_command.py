"""The ``torchrunx`` command: torchrun-style scripts on every rank, its options, its exit status."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest

import torchrunx
from torchrunx.integrations.cli import add_torchrunx_argument_group, launcher_from_args

if TYPE_CHECKING:
    from pathlib import Path

    from testbed.cluster import Cluster

TORCHRUN_SCRIPT = """
    import os, sys
    import torch
    import torch.distributed as dist

    def main():
        dist.init_process_group("gloo")  # as under torchrun: from RANK, WORLD_SIZE, MASTER_*
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total)
        rank = dist.get_rank()
        print(f"rank {rank}/{dist.get_world_size()} argv {sys.argv[1:]} sum {total.item()}")
        dist.destroy_process_group()
        if "--fail" in sys.argv and rank == 1:
            raise ValueError("a bad batch on rank 1")
        if "--exit" in sys.argv and rank == 1:
            sys.exit(int(sys.argv[sys.argv.index("--exit") + 1]))

    if __name__ == "__main__":
        main()
"""


def torchrunx_command(
    *args: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torchrunx", *args]
    env = {**os.environ, "TORCHRUNX_LOG_DIR": str(cwd / "logs")}
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    return path


def test_help_prints_at_once_with_every_launcher_field(tmp_path: Path) -> None:
    start = time.monotonic()
    done = torchrunx_command("--help", cwd=tmp_path, timeout=30)
    assert done.returncode == 0
    assert time.monotonic() - start < 10  # not an agent waiting for its boot line
    text = " ".join(done.stdout.split())
    for field in dataclasses.fields(torchrunx.Launcher):
        if field.init:
            assert f"--{field.name.replace('_', '-')}" in text, field.name
    assert "``" not in done.stdout
    assert ":class:" not in done.stdout


def test_every_field_round_trips_through_the_options() -> None:
    parser = argparse.ArgumentParser()
    add_torchrunx_argument_group(parser)
    args = parser.parse_args(
        [
            "--hostnames", "a", "b",
            "--workers-per-host", "2", "1",
            "--debug-ranks", "all",
            "--post-mortem",
            "--preload", "json", "numpy",
            "--no-learn-preload",
            "--sync-dir", "true",
            "--sync-exclude", "*.ckpt",
            "--python", "a=/py/a", "b=/py/b",
            "--preempt-signals", "SIGTERM", "SIGUSR1",
            "--preempt-grace", "5",
            "--max-restarts", "2",
            "--restart-on", "WorkerFailedError", "ValueError",
            "--spares", "1",
            "--heartbeat-timeout", "4.5",
            "--requeue",
        ]
    )  # fmt: skip
    launcher = launcher_from_args(args)
    assert launcher == torchrunx.Launcher(
        hostnames=["a", "b"],
        workers_per_host=[2, 1],
        debug_ranks="all",
        post_mortem=True,
        preload=("json", "numpy"),
        learn_preload=False,
        sync_dir=True,
        sync_exclude=("*.ckpt",),
        python={"a": "/py/a", "b": "/py/b"},
        preempt_signals=("SIGTERM", "SIGUSR1"),
        preempt_grace=5.0,
        max_restarts=2,
        restart_on=(torchrunx.WorkerFailedError, ValueError),
        spares=1,
        heartbeat_timeout=4.5,
        requeue=True,
    )
    bad = parser.parse_args(["--restart-on", "NoSuchError"])
    with pytest.raises(ValueError, match="'NoSuchError' is not an exception"):
        launcher_from_args(bad)


def test_a_torchrun_script_runs_on_every_rank(script: Path) -> None:
    done = torchrunx_command(
        "--hostnames", "localhost", "--workers-per-host", "2", "train.py", "--lr", "3",
        cwd=script.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rank 0/2 argv ['--lr', '3'] sum 1.0" in done.stdout  # rank 0, live
    (folder,) = (script.parent / "logs").iterdir()
    assert "rank 1/2 argv ['--lr', '3'] sum 1.0" in (folder / "localhost[1].log").read_text()


def test_a_failing_script_exits_1_with_its_own_traceback(script: Path) -> None:
    done = torchrunx_command("--workers-per-host", "2", "train.py", "--fail", cwd=script.parent)
    assert done.returncode == 1
    assert re.search(r'File "train.py", line \d+, in main\n +raise ValueError', done.stderr)
    assert "ValueError: a bad batch on rank 1" in done.stderr
    assert "command.py" not in done.stderr  # no frame of ours
    assert "runpy" not in done.stderr


def test_a_rank_exit_status_is_the_command_s(script: Path) -> None:
    done = torchrunx_command(
        "--workers-per-host", "2", "train.py", "--exit", "3", cwd=script.parent
    )
    assert done.returncode == 3
    assert "rank 1 exited with status 3" in done.stderr


def test_a_module_with_dash_m_and_a_process_group_from_backend(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "job.py").write_text(
        textwrap.dedent("""
        import sys
        import torch.distributed as dist
        if __name__ == "__main__":
            print(f"{__name__} {dist.is_initialized()} {dist.get_world_size()} {sys.argv[1:]}")
        """)
    )
    done = torchrunx_command(
        "--workers-per-host", "2", "--backend", "gloo", "-m", "pkg.job", "x", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "__main__ True 2 ['x']" in done.stdout


def test_bad_options_and_no_script_are_clear_errors(tmp_path: Path) -> None:
    done = torchrunx_command("--workers-per-host", "2", cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "name a script" in done.stderr
    done = torchrunx_command("--workers-per-host", "zero", "x.py", cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "whole numbers" in done.stderr


def test_a_torchrun_script_on_the_test_hosts(cluster: Cluster, script: Path) -> None:
    done = torchrunx_command(
        "--hostnames", *cluster.hostnames[:2],
        "--workers-per-host", "2",
        "--ssh-config-file", str(cluster.ssh_config),
        "train.py",
        cwd=script.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rank 0/4 argv [] sum 6.0" in done.stdout


@pytest.mark.parametrize("script", ["test_ops", "test_script"])
def test_scripts_of_another_project_run_as_under_torchrun(tmp_path: Path, script: str) -> None:
    """Hugging Face Accelerate's own distributed checks, which ``accelerate test`` launches."""
    pytest.importorskip("accelerate")
    done = torchrunx_command(
        "--workers-per-host", "2",
        "--extra-env-vars", "ACCELERATE_USE_CPU=1",  # copy_env_vars leaves ACCELERATE_* out
        "-m", f"accelerate.test_utils.scripts.{script}",
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*/localhost*.log"))
    assert "Traceback" not in logs
    if script == "test_ops":
        assert "testing sending tensors across devices" in logs
    else:
        assert "**Test reinstantiated state**" in logs


def test_a_script_of_another_project_on_the_test_hosts(cluster: Cluster, tmp_path: Path) -> None:
    done = torchrunx_command(
        "--hostnames", *cluster.hostnames[:2],
        "--workers-per-host", "1",
        "--ssh-config-file", str(cluster.ssh_config),
        "--extra-env-vars", "ACCELERATE_USE_CPU=1",
        "-m", "accelerate.test_utils.scripts.test_ops",
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (folder,) = (tmp_path / "logs").iterdir()
    for host in cluster.hostnames[:2]:
        assert "testing sending tensors across devices" in (folder / f"{host}[0].log").read_text()
