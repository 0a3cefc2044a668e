"""Requeueing the SLURM job after a preempted run (``requeue=True``): ``scontrol requeue`` and
what its answers mean, with a stand-in scontrol that answers as SLURM 22.05's does.

Real preemptions, on the SLURM test cluster, are in tests/test_examples.py (examples/
slurm_preempt.sh, preempted by a partition and by ``scancel --signal=USR1``).
"""

from __future__ import annotations

import os
import shlex
import stat
from typing import TYPE_CHECKING

from torchrunx.hosts import requeue_job

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def scontrol(folder: Path, monkeypatch: pytest.MonkeyPatch, rc: int, stderr: str = "") -> Path:
    """An ``scontrol`` first on PATH that exits with ``rc``; it writes its arguments to a file."""
    called = folder / "called"
    program = folder / "scontrol"
    program.write_text(
        f'#!/bin/sh\necho "$@" > {shlex.quote(str(called))}\n'
        f"echo {shlex.quote(stderr)} >&2\nexit {rc}\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    return called


def test_requeue_job_requeues_this_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    called = scontrol(tmp_path, monkeypatch, 0)
    assert requeue_job() is None
    assert called.read_text() == "requeue 42\n"


def test_a_job_that_slurm_requeued_first_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition's preemption whose grace ended: SLURM requeued the job before our call."""
    scontrol(tmp_path, monkeypatch, 1, "Job is pending execution for job 42")
    assert requeue_job() is None


def test_a_failure_says_what_scontrol_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scontrol(tmp_path, monkeypatch, 1, "Requested operation is presently disabled for job 42")
    why = requeue_job()
    assert why == "scontrol requeue 42: Requested operation is presently disabled for job 42"
