"""Preemption: training stops at a checkpoint, the SLURM job is requeued, and resumes there.

Run:  sbatch examples/slurm_preempt.sh            # a job that survives being preempted
      scancel --signal=USR1 <job id>              # as --signal=USR1@120 would, now
      python examples/slurm_preempt.py            # outside SLURM: kill -USR1 <its pid>, then
                                                  # run it again to resume
      python examples/slurm_preempt.py --help

Each attempt resumes from ``--checkpoint`` when it exists and trains up to ``--steps``, rank 0
saving every ``--save-every`` steps. A preemption signal that reaches the launcher or an agent
(SLURM signals the processes of the job's steps, and the agents of the other nodes are steps) is
a notice for every rank: SIGTERM when a job of a higher-priority partition takes the nodes,
SIGUSR1 from ``scancel --signal=USR1`` or ``#SBATCH --signal=USR1@SECONDS`` before the time
limit. The ranks agree on a step (``torchrunx.preempted(agree=True)``), save it and return;
the launcher requeues the job (``requeue=True``; SLURM would requeue a job it preempted when
its grace ends), ``run()`` raises ``torchrunx.PreemptedError`` and the script exits 0. The next
attempt (``SLURM_RESTART_COUNT``) resumes at that step: every step runs once.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.arange(1.0, 9.0)).unsqueeze(1)


def train(steps: int, save_every: int, step_time: float, checkpoint: str) -> dict[str, int]:
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path, first = Path(checkpoint), 0
    if path.exists():
        state = torch.load(path, weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["step"]

    def save(step: int) -> None:  # rank 0 only; atomic: a reader never sees half a file
        if rank == 0:
            state = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "step": step}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    if rank == 0:
        print(f"attempt {attempt}: starting at step {first}", flush=True)
    x, y = make_data()
    x, y = x[rank::world], y[rank::world]
    step = first
    # a collective, on every rank at every step: all of them stop at the same step
    while step < steps and not torchrunx.preempted(agree=True):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(step_time)  # the rest of a real step's work
        step += 1
        if step % save_every == 0:
            save(step)
    save(step)  # where it stopped: preempted, or done
    dist.barrier()  # every rank returns once the checkpoint is complete
    if rank == 0:
        print(f"attempt {attempt}: ran {step - first} steps ({first} to {step})", flush=True)
    return {"first": first, "stop": step}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    parser.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (default: 50)"
    )
    parser.add_argument(
        "--step-time", type=float, default=0.1, help="seconds each step sleeps (default: 0.1)"
    )
    parser.add_argument(
        "--checkpoint", default="preempt.pt", help="a file every node sees (default: preempt.pt)"
    )
    parser.add_argument(
        "--workers-per-host",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="a number, or auto: one per GPU, else 1 (default: auto)",
    )
    parser.add_argument(
        "--preempt-grace",
        type=float,
        default=20.0,
        help="seconds the ranks have to stop after a notice (default: 20)",
    )
    args = parser.parse_args()

    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    launcher = torchrunx.Launcher(
        hostnames="auto",  # inside a SLURM job: its nodes (agents as srun steps); else here
        workers_per_host=args.workers_per_host,
        preempt_signals=("SIGTERM", "SIGUSR1"),  # a partition's preemption; --signal=USR1@...
        preempt_grace=args.preempt_grace,
        requeue=True,  # inside a SLURM job: requeue it once a preempted run has ended
    )
    # open in the except too: SLURM's SIGTERM as it requeues the job is one more notice then,
    # not the end of this script
    with launcher:
        try:
            done = launcher.run(
                train, args.steps, args.save_every, args.step_time, args.checkpoint
            ).rank(0)
        except torchrunx.PreemptedError as e:
            stop = e.partial_results[0]["stop"] if 0 in e.partial_results else "a saved step"
            print(f"attempt {attempt}: preempted ({e.signals}), resumes at {stop}", flush=True)
            raise SystemExit(0) from None  # the next attempt resumes from the checkpoint
    print(f"attempt {attempt}: all {done['stop']} steps done", flush=True)
