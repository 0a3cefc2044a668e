"""Every script in examples/ runs, at small sizes, and does what its docstring says.

Each example runs as a subprocess in a temporary working directory, as a user would run it.
Multi-host examples run on the fake hosts of testbed/cluster.py, the SLURM ones on
testbed/slurm.py's cluster (those tests are marked multihost and skipped where this machine
cannot host them).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from testbed.slurm import HIGH_PARTITION, TERMINAL_STATES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from testbed.cluster import Cluster
    from testbed.slurm import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TIMEOUT_S = 90

TESTED = {
    "quickstart.py",
    "ddp_checkpoint.py",
    "pipeline.py",
    "sweep.py",
    "retries.py",
    "cli_argparse.py",
    "cli_tyro.py",
    "transformers_trainer.py",
    "lightning_trainer.py",
    "accelerate_train.py",
    "multihost.py",
    "slurm_batch.sh",
    "slurm_submitit.py",
    "slurm_preempt.py",
    "slurm_preempt.sh",
}


def run_example(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python examples/<name> args...`` in ``cwd``; fails the test unless it exits with 0."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=os.environ if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, f"{name} exited with {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def number_after(text: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)}\s*([-+0-9.e]+)", text)
    assert m is not None, f"no {label!r} in:\n{text}"
    return float(m.group(1))


# ---- every example is documented and tested


def test_every_example_is_tested_and_says_what_it_shows_and_how_to_run_it() -> None:
    names = {p.name for p in EXAMPLES.iterdir() if p.suffix in {".py", ".sh"}}
    assert names == TESTED
    for name in names:
        text = (EXAMPLES / name).read_text()
        if name.endswith(".py"):
            doc = ast.get_docstring(ast.parse(text))
            assert doc, f"{name} has no docstring"
        else:
            doc = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert f"examples/{name}" in doc, f"{name}'s docstring does not say how to run it"


# ---- on this machine


def test_quickstart(tmp_path: Path) -> None:
    out = run_example("quickstart.py", "--steps", "100", cwd=tmp_path)
    assert "Failed to initialize NumPy" not in out.stderr  # numpy is a dependency, as in 0.4
    assert "[localhost:0] step   0  loss" in out.stdout  # rank 0's lines, live
    assert "[localhost:1]" not in out.stdout
    assert number_after(out.stdout, "trained on 2 workers; mean squared error") < 0.01


def test_ddp_checkpoint_returns_a_path_the_launcher_loads(tmp_path: Path) -> None:
    out = run_example(
        "ddp_checkpoint.py", "--steps", "60", "--checkpoint-dir", "ckpt", cwd=tmp_path
    )
    assert "checkpoint: ckpt/model.pt" in out.stdout
    assert number_after(out.stdout, "after 60 steps on 2 workers: accuracy") > 0.9
    checkpoint = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert checkpoint["steps"] == 60
    assert set(checkpoint["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert list(tmp_path.joinpath("ckpt").iterdir()) == [tmp_path / "ckpt" / "model.pt"]


def test_pipeline_trains_on_2_workers_and_evaluates_on_1(tmp_path: Path) -> None:
    out = run_example("pipeline.py", "--steps", "40", cwd=tmp_path)
    assert "pretrain: 40 steps on 2 workers" in out.stdout
    assert "target: 40 steps on 2 workers" in out.stdout
    pretrained = number_after(out.stdout, "Pre-trained model accuracy:")
    finetuned = number_after(out.stdout, "Fine-tuned model accuracy:")
    assert 0.5 < pretrained < finetuned
    assert finetuned > 0.85


def test_sweep_continues_past_a_configuration_that_fails(tmp_path: Path) -> None:
    args = ["--lrs", "0.1", "--batch-sizes", "512", "32", "--steps", "20"]
    out = run_example("sweep.py", *args, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert lines[0] == "{'lr': 0.1, 'batch_size': 512} results in OOM... continuing..."
    assert lines[1].startswith("{'lr': 0.1, 'batch_size': 32}: loss ")
    assert "best of 1/2 configurations: {'lr': 0.1, 'batch_size': 32}" in lines[2]


def test_retries_resume_from_the_checkpoint_after_a_worker_is_killed(tmp_path: Path) -> None:
    out = run_example("retries.py", "--steps", "30", "--checkpoint-dir", "ckpt", cwd=tmp_path)
    text = out.stdout
    assert "Error occurred: worker rank 1 (local rank 1) on localhost" in text
    assert "was killed by SIGKILL" in text
    assert "Retrying (0) ..." in text
    assert "[localhost:0] resuming from step 10" in text
    assert "finished after 2 attempts" in text
    assert text.index("Retrying (0)") < text.index("resuming from step 10")
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["step"] == 30


@pytest.mark.parametrize("name", ["cli_argparse.py", "cli_tyro.py"])
def test_cli(name: str, tmp_path: Path) -> None:
    if name == "cli_tyro.py":
        pytest.importorskip("tyro")
    args = ["--workers-per-host", "2", "--backend", "gloo", "--live-ranks", "all", "--lr", "0.5"]
    out = run_example(name, *args, cwd=tmp_path)
    assert "[localhost:0] rank 0 of 2" in out.stdout
    assert "[localhost:1] rank 1 of 2" in out.stdout
    assert "2 workers on ['localhost']: w = 3.0000" in out.stdout


def test_cli_help_lists_the_launcher_options(tmp_path: Path) -> None:
    out = run_example("cli_argparse.py", "--help", cwd=tmp_path)
    for option in ("--lr", "--hostnames", "--workers-per-host", "--ssh-config-file", "--encrypt"):
        assert option in out.stdout


def test_transformers_trainer(tmp_path: Path) -> None:
    needs("transformers", "accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing may be downloaded
    out = run_example(
        "transformers_trainer.py", "--steps", "2", "--output-dir", "hf", cwd=tmp_path, env=env
    )
    logged = [line for line in out.stdout.splitlines() if line.startswith("[localhost:0] {'loss'")]
    assert len(logged) == 2  # Trainer's log of each step, from rank 0
    assert "'train_loss'" in out.stdout
    assert "loaded the fine-tuned model from hf: loss" in out.stdout
    assert (tmp_path / "hf" / "config.json").is_file()


def needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (pip install {' '.join(modules)})")


def test_lightning_trainer(tmp_path: Path) -> None:
    needs("lightning", "transformers", "tyro")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing may be downloaded
    args = ["--steps", "3", "--checkpoint", "trained.ckpt", "--launcher.workers-per-host", "2"]
    out = run_example("lightning_trainer.py", *args, cwd=tmp_path, env=env)
    assert "[localhost:0] rank 0 of 2: 3 steps" in out.stdout
    assert "[localhost:1] rank 1 of 2: 3 steps" in out.stdout
    assert "loaded trained.ckpt (step 3): loss" in out.stdout
    assert (tmp_path / "trained.ckpt").is_file()
    # Lightning prints through a handler of its own: each message once, as under torchrun
    stopped = [line for line in out.stderr.splitlines() if "`Trainer.fit` stopped" in line]
    assert stopped == ["[localhost:0] `Trainer.fit` stopped: `max_steps=3` reached."]


def test_accelerate_train(tmp_path: Path) -> None:
    needs("accelerate", "transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = run_example("accelerate_train.py", "--steps", "6", cwd=tmp_path, env=env)
    assert "[localhost:0] step 5: mean loss over 2 workers" in out.stdout
    assert "[localhost:1]" not in out.stdout  # accelerator.print: the main process only
    untrained = number_after(out.stdout, "held-out loss:")
    trained = number_after(out.stdout, "untrained,")
    assert trained < untrained - 0.2


# ---- on several hosts


def test_multihost_on_two_hosts(cluster: Cluster, tmp_path: Path) -> None:
    hosts = cluster.hostnames[:2]
    args = ["--hostnames", *hosts, "--workers-per-host", "2", "--ssh-config-file"]
    out = run_example("multihost.py", *args, str(cluster.ssh_config), "--steps", "50", cwd=tmp_path)
    assert f"{hosts[0]}: rank 0 on {hosts[0]} (cpu), rank 1 on {hosts[0]} (cpu)" in out.stdout
    assert f"{hosts[1]}: rank 2 on {hosts[1]} (cpu), rank 3 on {hosts[1]} (cpu)" in out.stdout
    assert "trained on 4 workers of 2 hosts" in out.stdout
    assert f"evaluated on {hosts[0]}: mean squared error" in out.stdout
    assert number_after(out.stdout, "mean squared error") < 0.01


def test_pipeline_on_two_hosts(cluster: Cluster, tmp_path: Path) -> None:
    """The seed's shape: training on every worker of two hosts, evaluation on one worker."""
    args = ["--hostnames", *cluster.hostnames[:2], "--workers-per-host", "1", "--steps", "40"]
    out = run_example(
        "pipeline.py", *args, "--ssh-config-file", str(cluster.ssh_config), cwd=tmp_path
    )
    assert "pretrain: 40 steps on 2 workers" in out.stdout
    assert f"[{cluster.hostnames[0]}:0] target: 40 steps on 2 workers" in out.stdout
    pretrained = number_after(out.stdout, "Pre-trained model accuracy:")
    assert pretrained < number_after(out.stdout, "Fine-tuned model accuracy:")


# ---- SLURM


@pytest.fixture
def fresh_slurm(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    yield slurm
    left = slurm.reset(wait=10)
    assert not left, f"job processes left on the nodes: {left}"


def test_slurm_batch_script(
    fresh_slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sbatch examples/slurm_batch.sh`` from the repository root, with this venv active."""
    slurm = fresh_slurm
    venv_path = f"{Path(sys.executable).parent}{os.pathsep}{slurm.env['PATH']}"
    monkeypatch.setitem(slurm.env, "PATH", venv_path)  # the job inherits sbatch's environment
    output = tmp_path / "slurm-%j.out"
    job = slurm.sbatch(EXAMPLES / "slurm_batch.sh", 2, [f"--chdir={REPO}", f"--output={output}"])
    state = slurm.wait_job(job, timeout=120)
    log_file = tmp_path / f"slurm-{job}.out"
    log = log_file.read_text() if log_file.exists() else ""
    assert state == "COMPLETED", log
    first, second = slurm.nodes[:2]
    assert f"{first}: rank 0 on {first} (cpu)" in log  # "auto": 1 worker per node without GPUs
    assert f"{second}: rank 1 on {second} (cpu)" in log
    assert "trained on 2 workers of 2 hosts" in log
    assert f"evaluated on {first}: mean squared error" in log


def test_slurm_submitit(fresh_slurm: SlurmCluster, tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    slurm = fresh_slurm
    args = ["--nodes", "2", "--workers-per-host", "2", "--steps", "20", "--folder", "jobs"]
    out = run_example("slurm_submitit.py", *args, cwd=tmp_path, env=slurm.environ())
    first, second = slurm.nodes[:2]
    assert re.search(r"submitted job \d+", out.stdout)
    assert f"workers per host {{'{first}': 2, '{second}': 2}}" in out.stdout
    assert f"ranks on {[first, first, second, second]}" in out.stdout
    assert "weights: {'weight': [" in out.stdout


PREEMPT_STEPS = 60


@pytest.mark.parametrize(
    ("preemption", "nodes"), [("partition", 2), ("scancel", 2), ("partition", 1), ("scancel", 1)]
)
def test_slurm_preempt_stops_at_a_checkpoint_and_resumes_after_the_requeue(
    slurm_preemption: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    preemption: str,
    nodes: int,
) -> None:
    """``sbatch examples/slurm_preempt.sh``, then a job of a higher-priority partition needs its
    nodes (SLURM sends SIGTERM to the steps, and requeues the job) or ``scancel --signal=USR1``
    (our agent's step gets SIGUSR1; the launcher requeues the job): the ranks stop at a step,
    saved; the next attempt resumes there and finishes. Each takes about 15 s. On one node too:
    the launcher's own node's agent is a job step, so SLURM's signal reaches it."""
    slurm = slurm_preemption
    venv_path = f"{Path(sys.executable).parent}{os.pathsep}{slurm.env['PATH']}"
    monkeypatch.setitem(slurm.env, "PATH", venv_path)  # the job inherits sbatch's environment
    checkpoint = tmp_path / "preempt.pt"
    # --exclusive: the nodes' CPUs are all the job's, so that a job of "high" needs them
    first = slurm.nodes[0]
    sbatch = ["--exclusive", f"--chdir={REPO}", f"--output={tmp_path / 'slurm-%j.out'}"]
    if nodes == 1:
        sbatch.append(f"--nodelist={first}")
    steps = ["--steps", str(PREEMPT_STEPS), "--save-every", "10", "--step-time", "0.05"]
    job = slurm.sbatch(
        EXAMPLES / "slurm_preempt.sh", nodes, sbatch, [*steps, "--checkpoint", str(checkpoint)]
    )
    log_file = tmp_path / f"slurm-{job}.out"

    def log() -> str:
        return log_file.read_text() if log_file.exists() else ""

    deadline = time.monotonic() + 120
    while not checkpoint.exists():  # 10 steps done
        state = slurm.job_state(job)
        assert state not in TERMINAL_STATES, f"job {job} {state}:\n{log()}"
        assert time.monotonic() < deadline, f"no checkpoint in 120 s:\n{log()}"
        time.sleep(0.1)

    sent = time.monotonic()
    signal = preempt(slurm, job, preemption, tmp_path, nodes)
    slurm.wait_job(job, timeout=60, until={"PENDING"}, restarts=1, reason="BeginTime")
    assert slurm.grace_time is not None
    assert time.monotonic() - sent < slurm.grace_time, log()  # by the notice, not SLURM's kill
    stop = torch.load(checkpoint, weights_only=True)["step"]
    assert 10 <= stop < PREEMPT_STEPS
    # the notice came from the agents (job steps), every node's, and the except ran
    said = rf"attempt 0: preempted \((\{{.*\}})\), resumes at {stop}\n"
    found = re.search(said, log())
    assert found, log()
    for node in slurm.nodes[:nodes]:
        assert f"'{node}': '{signal}'" in found[1], log()
    assert wait_no_job_processes(slurm) == []  # nothing of the first attempt is left

    slurm.release(job)
    assert slurm.wait_job(job, timeout=120, restarts=1) == "COMPLETED", log()
    assert slurm.restarts(job) == 1  # requeued once, whoever did
    text = log()
    ran = re.findall(rf"\[{first}:0\] attempt (\d): ran \d+ steps \((\d+) to (\d+)\)", text)
    assert ran == [("0", "0", str(stop)), ("1", str(stop), str(PREEMPT_STEPS))], text
    where = "node[1-2]" if nodes == 2 else first
    assert f"job {job}, attempt 1, on {where}" in text  # the batch script's own line
    assert f"[{first}:0] attempt 1: starting at step {stop}" in text  # rank 0's SLURM_RESTART_COUNT
    assert f"attempt 1: all {PREEMPT_STEPS} steps done" in text
    assert "could not requeue" not in text
    assert torch.load(checkpoint, weights_only=True)["step"] == PREEMPT_STEPS
    assert wait_no_job_processes(slurm) == []


def preempt(slurm: SlurmCluster, job: str, how: str, folder: Path, nodes: int) -> str:
    """Preempt the job (``how``: by a job of the high partition, or scancel); the signal's name."""
    if how == "partition":
        (folder / "urgent.sh").write_text("#!/bin/sh\nsleep 1\n")
        options = [f"--partition={HIGH_PARTITION}", "--exclusive"]
        if nodes == 1:  # the victim's node, not the free one
            options.append(f"--nodelist={slurm.nodes[0]}")
        urgent = slurm.sbatch(folder / "urgent.sh", nodes, options)
        slurm.wait_job(urgent, timeout=60, until={"RUNNING", "COMPLETED"})
        return "SIGTERM"
    slurm.scancel(job, ["--signal=USR1"])
    return "SIGUSR1"


def wait_no_job_processes(slurm: SlurmCluster, timeout: float = 10.0) -> list[str]:
    """Until no process of a job runs on the nodes (bounded); those left."""
    deadline = time.monotonic() + timeout
    while slurm.job_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    return slurm.job_processes()


def test_slurm_preempt_help_lists_its_options(tmp_path: Path) -> None:
    out = run_example("slurm_preempt.py", "--help", cwd=tmp_path)
    for option in ("--steps", "--save-every", "--checkpoint", "--workers-per-host"):
        assert option in out.stdout
