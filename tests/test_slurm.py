"""Launching inside real SLURM jobs: hostnames="slurm", agents by srun or SSH, scancel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from testbed.slurm import SlurmCluster

LAUNCH = textwrap.dedent("""
    import json, os, socket, sys, time
    import torch, torch.distributed as dist, torchrunx

    def work(hold):
        t = torch.tensor([float(os.environ["RANK"]) + 1])
        dist.all_reduce(t)
        if hold:
            open(f"up.{os.environ['RANK']}", "w").close()
            time.sleep(300)
        return socket.gethostname(), int(os.environ["RANK"]), t.item()

    start, hold, out = sys.argv[1], sys.argv[2] == "hold", sys.argv[3]
    fields = {"ssh_config_file": sys.argv[4]} if start == "ssh" else {}
    with torchrunx.Launcher(hostnames="slurm", workers_per_host=2, backend="gloo",
                            agent_start=start, **fields) as launcher:
        result = launcher.run(work, hold)
    with open(out, "w") as f:
        json.dump({"hosts": result.by_hostname(), "job": os.environ["SLURM_JOB_ID"]}, f)
""")


def batch_script(folder: Path, start: str, ssh_config: Path, *, hold: bool = False) -> Path:
    (folder / "launch.py").write_text(LAUNCH)
    script = folder / "job.sh"
    args = f"{start} {'hold' if hold else 'run'} out.json {ssh_config}"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} launch.py {args}\n")
    return script


@pytest.fixture
def fresh_slurm(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    yield slurm
    left = slurm.reset(wait=10)
    assert not left, f"job processes left on the nodes: {left}"


@pytest.mark.parametrize("start", ["srun", "ssh"])
def test_batch_job_launches_on_its_nodes(
    fresh_slurm: SlurmCluster, tmp_path: Path, start: str
) -> None:
    slurm = fresh_slurm
    script = batch_script(tmp_path, start, slurm.cluster.ssh_config)
    job = slurm.sbatch(script, 2)
    state = slurm.wait_job(job, timeout=120)
    log = (
        (tmp_path / f"slurm-{job}.out").read_text()
        if (tmp_path / f"slurm-{job}.out").exists()
        else ""
    )
    assert state == "COMPLETED", log
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["job"] == job
    hosts = out["hosts"]
    assert list(hosts) == slurm.nodes[:2]
    for host, values in hosts.items():
        assert [v[0] for v in values] == [host, host]
    assert sorted(v[1] for values in hosts.values() for v in values) == [0, 1, 2, 3]
    assert {v[2] for values in hosts.values() for v in values} == {10.0}


def test_scancel_leaves_nothing_on_any_node(fresh_slurm: SlurmCluster, tmp_path: Path) -> None:
    slurm = fresh_slurm
    job = slurm.sbatch(batch_script(tmp_path, "srun", slurm.cluster.ssh_config, hold=True), 2)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("up.*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(tmp_path.glob("up.*"))) == 4, slurm.job_processes()
    slurm.scancel(job)
    slurm.wait_job(job, timeout=60)
    deadline = time.monotonic() + 10
    while slurm.job_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slurm.job_processes() == []


TRAIN = textwrap.dedent("""
    import os, sys
    import submitit, torchrunx

    def launch_training():
        # submitit runs this once per task (one per node): the first task launches
        if submitit.JobEnvironment().global_rank != 0:
            return None
        with torchrunx.Launcher(hostnames="slurm", workers_per_host=2, backend=None) as launcher:
            return launcher.run(lambda: int(os.environ["RANK"])).by_hostname()

    if __name__ == "__main__":
        executor = submitit.SlurmExecutor(folder="submitit", python=sys.executable)
        executor.update_parameters(nodes=2, ntasks_per_node=1, time=5)
        print(executor.submit(launch_training).results()[0])
""")


def test_submitit_submits_a_function_that_launches(
    fresh_slurm: SlurmCluster, tmp_path: Path
) -> None:
    slurm = fresh_slurm
    (tmp_path / "train.py").write_text(TRAIN)
    out = subprocess.run(
        [sys.executable, "train.py"],
        cwd=tmp_path,
        env=slurm.environ(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    expected = {slurm.nodes[0]: [0, 1], slurm.nodes[1]: [2, 3]}
    assert out.stdout.strip().splitlines()[-1] == repr(expected)


def test_salloc_from_a_login_node(fresh_slurm: SlurmCluster, tmp_path: Path) -> None:
    """The launcher runs where salloc runs (here: the head, which resolves the node names
    through a hosts file of its own, as a login node would); agents start as srun steps."""
    slurm = fresh_slurm
    batch_script(tmp_path, "srun", slurm.cluster.ssh_config)  # writes launch.py
    login = 'mount --bind "$0" /etc/hosts && cd "$1" && exec "$2" launch.py srun run out.json -'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", login]
    out = slurm.salloc(
        2, [*command, str(slurm.cluster.hosts_file), str(tmp_path), sys.executable], timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    hosts = json.loads((tmp_path / "out.json").read_text())["hosts"]
    assert list(hosts) == slurm.nodes[:2]
    assert {v[2] for values in hosts.values() for v in values} == {10.0}
