"""A multi-stage pipeline in one script: pre-train on 2 workers, evaluate on 1, fine-tune, evaluate.

Run:  python examples/pipeline.py [--hostnames localhost] [--workers-per-host 2] [--steps 60]
      python examples/pipeline.py --hostnames node1 node2 --ssh-config-file ~/.ssh/config

Two launchers with different degrees of parallelism: one trains on every worker of every host,
the other evaluates on a single worker of the first host. Each ``run`` gets fresh processes that
are gone when it returns, so nothing of one stage (memory, threads, CUDA context) leaks into the
next; the models travel back to this script as return values.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx

FEATURES = 16


def make_data(task: str, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related classification tasks: "pretrain" (plentiful) and "target" (what we want)."""
    g = torch.Generator().manual_seed(0 if task == "pretrain" else 1)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.ones(FEATURES)
    if task == "target":
        w[: FEATURES // 2] = -0.2  # the target task weighs half of the features differently
    return x, (x @ w > 0).long()


def fit(model: torch.nn.Module, task: str, steps: int, lr: float) -> torch.nn.Module:
    """Train ``model`` with DDP on this worker's shard of ``task``; return the plain module."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
    x, y = make_data(task)
    x, y = x[rank::world], y[rank::world]
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if rank == 0:
        print(f"{task}: {steps} steps on {world} workers, final loss {loss.item():.4f}")
    return ddp.module


def train(steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    )
    return fit(model, "pretrain", steps, lr=0.01)


def finetuning(model: torch.nn.Module, steps: int = 60) -> torch.nn.Module:
    return fit(model, "target", steps, lr=0.005)


def evaluation(model: torch.nn.Module) -> float:
    """Accuracy on the target task; each worker scores its shard, the counts are summed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_data("target")
    x, y = x[rank::world], y[rank::world]
    with torch.no_grad():
        counts = torch.tensor([(model(x).argmax(dim=1) == y).sum().item(), len(y)])
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostnames", nargs="+", default=["localhost"], help="training hosts")
    parser.add_argument("--workers-per-host", type=int, default=2, help="training workers")
    parser.add_argument("--ssh-config-file", default=None, help="SSH config for the hosts")
    parser.add_argument("--steps", type=int, default=60, help="steps of each training stage")
    args = parser.parse_args()
    common = {"ssh_config_file": args.ssh_config_file, "backend": "gloo"}

    # all hosts x N workers
    train_launcher = torchrunx.Launcher(
        hostnames=args.hostnames, workers_per_host=args.workers_per_host, **common
    )
    # 1 worker
    eval_launcher = torchrunx.Launcher(hostnames=args.hostnames[:1], workers_per_host=1, **common)

    with train_launcher, eval_launcher:
        pretrained_model = train_launcher.run(train, steps=args.steps).rank(0)
        pretrained_acc = eval_launcher.run(evaluation, model=pretrained_model).rank(0)
        print(f"Pre-trained model accuracy: {pretrained_acc:.3f}")

        finetuned_model = train_launcher.run(
            finetuning, model=pretrained_model, steps=args.steps
        ).rank(0)
        finetuned_acc = eval_launcher.run(evaluation, model=finetuned_model).rank(0)
        print(f"Fine-tuned model accuracy: {finetuned_acc:.3f}")
