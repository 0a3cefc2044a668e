"""DDP training that saves a checkpoint and returns its path; the launcher loads it.

Run:  python examples/ddp_checkpoint.py [--workers 2] [--steps 100] [--checkpoint-dir checkpoints]

Returning a model's weights from ``run`` is fine for small models. For large ones, have rank 0
write a checkpoint and return its path: only a string travels back, and the checkpoint stays on
disk for the next stage. On several hosts, put it on a filesystem every host shares.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def make_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-class problem: is the sum of the 16 features positive?"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return x, (x.sum(dim=1) > 0).long()


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def train(steps: int, lr: float, checkpoint_dir: str) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = make_data()
    x, y = x[rank::world], y[rank::world]
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 25 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    path = Path(checkpoint_dir) / "model.pt"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": model.module.state_dict(), "steps": steps}, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a file
    dist.barrier()  # every rank returns only once the file is complete
    return str(path)


def accuracy(model: torch.nn.Module) -> float:
    x, y = make_data()
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="(default: checkpoints)")
    args = parser.parse_args()

    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=args.workers, backend="gloo"
    )
    with launcher:
        result = launcher.run(
            train, steps=args.steps, lr=args.lr, checkpoint_dir=args.checkpoint_dir
        )
    path = result.rank(0)  # every rank returned the same path
    print(f"checkpoint: {path}")

    # the launcher process loads it like any other checkpoint
    checkpoint = torch.load(path, weights_only=True)
    model = make_model()
    model.load_state_dict(checkpoint["model"])
    steps, acc = checkpoint["steps"], accuracy(model)
    print(f"after {steps} steps on {args.workers} workers: accuracy {acc:.3f}")
