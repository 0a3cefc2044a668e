"""The SLURM test bed itself (testbed/slurm.py): allocations, batch jobs, cancelling, and a
teardown that leaves no daemon behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from testbed.slurm import SlurmCluster

pytestmark = pytest.mark.multihost


def test_salloc_srun_runs_one_task_per_node(slurm: SlurmCluster) -> None:
    done = slurm.salloc(2, ["srun", "hostname"], timeout=30)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["node1", "node2"]


def test_jobs_run_this_python_on_the_nodes(slurm: SlurmCluster) -> None:
    code = (
        "import socket, torch, torchrunx; print(socket.gethostname(), socket.gethostbyname('head'))"
    )
    done = slurm.salloc(2, ["srun", sys.executable, "-c", code], timeout=60)
    assert done.returncode == 0, done.stderr
    head = slurm.cluster.head_ip
    assert sorted(done.stdout.splitlines()) == [f"node1 {head}", f"node2 {head}"]


def test_sbatch_job_completes_on_two_nodes(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(
        '#!/bin/sh\necho "job=$SLURM_JOB_ID"\nscontrol show hostnames "$SLURM_JOB_NODELIST"\n'
        "srun hostname | sort\n"
    )
    job = slurm.sbatch(script, 2)
    assert slurm.wait_job(job, timeout=30) == "COMPLETED"
    lines = (tmp_path / f"slurm-{job}.out").read_text().splitlines()
    assert lines == [f"job={job}", "node1", "node2", "node1", "node2"]
    assert slurm.job_pids() == []


def test_scancel_ends_a_running_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "sleep.sh"
    script.write_text("#!/bin/sh\nsrun sleep 300\n")
    job = slurm.sbatch(script, 2)
    assert slurm.wait_job(job, timeout=30, until={"RUNNING"}) == "RUNNING"
    deadline = time.monotonic() + 10
    while len(slurm.job_pids()) < 3 and time.monotonic() < deadline:  # batch script + 2 steps
        time.sleep(0.05)
    assert slurm.job_pids(), "the job runs no process"
    slurm.scancel(job)
    assert slurm.wait_job(job, timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 10
    while slurm.job_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slurm.job_pids() == []


def test_reset_cancels_jobs_and_kills_their_processes(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "left.sh"
    script.write_text("#!/bin/sh\nsrun sleep 300\n")
    job = slurm.sbatch(script, 1)
    slurm.wait_job(job, timeout=30, until={"RUNNING"})
    deadline = time.monotonic() + 10  # RUNNING comes before slurmstepd has started the script
    while not any("sleep 300" in p for p in slurm.job_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = slurm.reset()
    assert any("sleep 300" in p or "left.sh" in p or "slurm_script" in p for p in left), left
    assert slurm.job_pids() == []
    assert slurm.wait_job(job, timeout=10) == "CANCELLED"
    assert slurm.reset() == []


REQUEUE_ONCE = """#!/bin/sh
echo "attempt ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    srun sleep 300
fi
"""


def test_a_requeued_job_is_held_until_released_then_runs_again(
    slurm_preemption: SlurmCluster, tmp_path: Path
) -> None:
    slurm = slurm_preemption
    sinfo = slurm.run(["sinfo", "-h", "-o", "%P %l"]).stdout.split("\n")
    assert sinfo[:2] == ["low* infinite", "high infinite"]
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_ONCE)
    job = slurm.sbatch(script, 1, ["--requeue", "--open-mode=append"])
    # held: it would start minutes later
    held = slurm.wait_job(job, timeout=30, until={"PENDING"}, restarts=1, reason="BeginTime")
    assert held == "PENDING"
    deadline = time.monotonic() + 10
    while slurm.job_pids() and time.monotonic() < deadline:  # the first attempt's are ending
        time.sleep(0.05)
    assert slurm.job_processes() == []
    slurm.release(job)
    assert slurm.wait_job(job, timeout=30, restarts=1) == "COMPLETED"
    assert slurm.restarts(job) == 1
    lines = (tmp_path / f"slurm-{job}.out").read_text().splitlines()
    assert [line for line in lines if line.startswith("attempt")] == ["attempt 0", "attempt 1"]


def test_down_stops_every_daemon(slurm_factory: Callable[..., SlurmCluster]) -> None:
    sl = slurm_factory(1)  # beside the session's cluster: a port of its own
    daemons = sl.daemons()
    assert sorted(daemons) == ["munged", "slurmctld", "slurmd@node1"]
    done = sl.salloc(1, ["srun", "hostname"], timeout=30)
    assert done.stdout.split() == ["node1"], done.stderr
    sl.down()
    assert sl.daemons() == {}
    assert not sl.state_dir.exists()
    left = [pid for pid in daemons.values() if running(pid)]
    left += [pid for pid in all_pids() if running(pid) and str(sl.state_dir) in cmdline(pid)]
    assert not left, f"still running: {left}"
    sl.down()  # idempotent


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that init has yet to reap does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
