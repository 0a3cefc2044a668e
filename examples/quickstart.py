"""Quick start: train a small model with DDP on 2 CPU workers (gloo), get the weights back.

Run:  python examples/quickstart.py [--workers 2] [--steps 200]

The launcher starts one agent on this machine; each ``run`` forks fresh workers, joins them in a
process group, and returns what every worker returned (here: rank 0's trained weights).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.arange(1.0, 9.0) + 0.5
    return x, y.unsqueeze(1)


def train(steps: int, lr: float) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = make_data()
    x, y = x[rank::world], y[rank::world]  # each worker its shard
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # gradients are all-reduced across workers here
        optimizer.step()
        if rank == 0 and step % 50 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return model.module.state_dict()


def evaluate(weights: dict[str, torch.Tensor]) -> float:
    model = torch.nn.Linear(8, 1)
    model.load_state_dict(weights)
    x, y = make_data()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    args = parser.parse_args()

    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=args.workers, backend="gloo"
    ) as launcher:
        weights = launcher.run(train, steps=args.steps, lr=0.05).rank(0)
        mse = launcher.run(evaluate, weights).rank(0)  # same agents, fresh workers
    print(f"trained on {args.workers} workers; mean squared error {mse:.5f}")
