"""Command lines: tyro on the Launcher dataclass, and the argparse helpers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import tyro

import torchrunx
from torchrunx.integrations.cli import add_torchrunx_argument_group, launcher_from_args


def test_tyro_builds_a_launcher_from_a_command_line() -> None:
    launcher = tyro.cli(
        torchrunx.Launcher,
        args=[
            "--hostnames", "node1", "node2",
            "--workers-per-host", "2", "1",
            "--backend", "gloo",
            "--extra-env-vars", "A", "1 2",
            "--live-ranks", "all",
        ],
    )  # fmt: skip
    assert launcher.hostnames == ["node1", "node2"]
    assert launcher.workers_per_host == [2, 1]
    assert launcher.backend == "gloo"
    assert launcher.extra_env_vars == {"A": "1 2"}
    assert launcher.live_ranks == "all"


def test_tyro_help_shows_the_field_docs() -> None:
    program = "import tyro, torchrunx; tyro.cli(torchrunx.Launcher)"
    out = subprocess.run(
        [sys.executable, "-c", program, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    shown = " ".join(out.stdout.replace("│", " ").split())  # tyro draws boxes and wraps lines
    for text in ("--workers-per-host", "counted on each host", "--agent-timeout", "silent"):
        assert text in shown
    assert "``" not in out.stdout  # plain text: no markup of docstrings in any help
    assert ":class:" not in out.stdout


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py")
    p.add_argument("--lr", type=float, default=0.1)
    add_torchrunx_argument_group(p)
    return p


def test_argparse_defaults_are_the_launchers() -> None:
    assert launcher_from_args(parser().parse_args([])) == torchrunx.Launcher()


def test_argparse_every_field() -> None:
    args = parser().parse_args(
        [
            "--lr", "0.5",
            "--hostnames", "localhost",
            "--workers-per-host", "3",
            "--ssh-config-file", "cfg",
            "--backend", "None",
            "--worker-timeout", "30",
            "--agent-timeout", "20",
            "--copy-env-vars", "PATH", "MY_*",
            "--extra-env-vars", "A=1", "B=x=y",
            "--log-dir", "",
            "--agent-start", "ssh",
            "--encrypt",
            "--live-ranks", "0", "2",
        ]
    )  # fmt: skip
    launcher = launcher_from_args(args)
    assert args.lr == 0.5
    assert launcher == torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=3,
        ssh_config_file="cfg",
        backend=None,
        worker_timeout=30,
        agent_timeout=20,
        copy_env_vars=("PATH", "MY_*"),
        extra_env_vars={"A": "1", "B": "x=y"},
        log_dir="",
        agent_start="ssh",
        encrypt=True,
        live_ranks=[0, 2],
    )
    assert launcher_from_args(parser().parse_args(["--hostnames", "slurm"])).hostnames == "slurm"
    assert (
        launcher_from_args(parser().parse_args(["--workers-per-host", "gpu"])).workers_per_host
        == "gpu"
    )


def test_argparse_help_and_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--workers-per-host N [N ...]" in text
    assert "counted on each host" in text
    with pytest.raises(ValueError, match="NAME=VALUE"):
        launcher_from_args(parser().parse_args(["--extra-env-vars", "NOEQUALS"]))
    with pytest.raises(ValueError, match="whole numbers"):
        launcher_from_args(parser().parse_args(["--workers-per-host", "two"]))
    with pytest.raises(ValueError, match="workers_per_host"):
        launcher_from_args(parser().parse_args(["--workers-per-host", "0"]))
