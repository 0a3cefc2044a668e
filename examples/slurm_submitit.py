"""Submit a launch to SLURM from Python with submitit: the job runs torchrunx on its nodes.

Run:  python examples/slurm_submitit.py [--nodes 2] [--workers-per-host auto] [--partition NAME]

submitit pickles ``launch`` and runs it in a batch job, once per task (one task per node here).
The first task is the launcher: ``hostnames="slurm"`` takes the job's nodes and starts an agent
on each as an srun job step; the other tasks have nothing to do. ``job.results()[0]`` is what the
first task returned, here the trained weights and where each rank ran.
"""

from __future__ import annotations

import argparse
import os
import socket

import submitit
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def train(steps: int) -> tuple[str, dict[str, torch.Tensor]]:
    rank = dist.get_rank()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1).to(dev))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(256, 4, generator=g).to(dev)
    y = x.sum(dim=1, keepdim=True)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return socket.gethostname(), {k: v.cpu() for k, v in model.module.state_dict().items()}


def launch(workers_per_host: int | str, steps: int) -> dict[str, object] | None:
    """Run by submitit in every task of the job; the first task launches on all the nodes."""
    if submitit.JobEnvironment().global_rank != 0:
        return None
    with torchrunx.Launcher(hostnames="slurm", workers_per_host=workers_per_host) as launcher:
        result = launcher.run(train, steps=steps)
    return {
        "job": os.environ["SLURM_JOB_ID"],
        "hosts": {host: len(values) for host, values in result.by_hostname().items()},
        "ranks on": [host for host, _ in result.by_rank()],
        "weights": result.rank(0)[1],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes of the job (default: 2)")
    parser.add_argument("--workers-per-host", default="auto", help="a number, gpu, cpu or auto")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default: 50)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the default)")
    parser.add_argument("--folder", default="submitit_logs", help="submitit's job folder")
    args = parser.parse_args()
    workers = (
        int(args.workers_per_host) if args.workers_per_host.isdigit() else args.workers_per_host
    )

    executor = submitit.SlurmExecutor(folder=args.folder)
    executor.update_parameters(nodes=args.nodes, ntasks_per_node=1, time=10)
    if args.partition:
        executor.update_parameters(partition=args.partition)
    job = executor.submit(launch, workers, args.steps)
    print(f"submitted job {job.job_id}; waiting for it")
    out = job.results()[0]  # re-raises what the job raised
    print(f"job {out['job']}: workers per host {out['hosts']}; ranks on {out['ranks on']}")
    print(f"weights: { {k: v.flatten().tolist() for k, v in out['weights'].items()} }")
