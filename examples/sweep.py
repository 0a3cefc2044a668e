"""A hyper-parameter sweep on one launcher that continues past a configuration that fails.

Run:  python examples/sweep.py [--lrs 0.01 0.1] [--batch-sizes 32 128 512] [--memory-budget 256]

One launcher serves every configuration: its agents stay up, so only the first configuration
pays for starting them; each configuration gets fresh workers. A configuration that raises
in a worker raises the same exception type here, and the sweep moves on. On a GPU the usual
failure is ``torch.cuda.OutOfMemoryError`` for a batch size too large; on this CPU example the
training function raises that exception itself when a batch would exceed ``--memory-budget``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def make_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.linspace(-1.0, 1.0, 8)).unsqueeze(1)


def train(lr: float, batch_size: int, steps: int, memory_budget: int) -> float:
    """Train with these hyper-parameters; return the final loss (averaged over the workers)."""
    if batch_size > memory_budget:  # stands in for the GPU running out of memory
        msg = f"CUDA out of memory: batch size {batch_size} > budget {memory_budget} (simulated)"
        raise torch.cuda.OutOfMemoryError(msg)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = make_data()
    x, y = x[rank::world], y[rank::world]
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        batch = torch.randint(len(x), (batch_size,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y)
    dist.all_reduce(final)
    return final.item() / world


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=50, help="steps per configuration")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--memory-budget", type=int, default=256, help="largest batch that fits")
    args = parser.parse_args()

    configs = [
        {"lr": lr, "batch_size": batch_size}
        for lr, batch_size in itertools.product(args.lrs, args.batch_sizes)
    ]
    losses = {}
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=args.workers, backend="gloo", live_ranks=[]
    ) as launcher:
        for config in configs:
            start = time.perf_counter()
            try:
                loss = launcher.run(
                    train, **config, steps=args.steps, memory_budget=args.memory_budget
                ).rank(0)
            except torch.cuda.OutOfMemoryError:
                print(f"{config} results in OOM... continuing...")
                continue
            losses[str(config)] = loss
            print(f"{config}: loss {loss:.5f} ({time.perf_counter() - start:.2f} s)")

    best = min(losses, key=losses.__getitem__)
    print(f"best of {len(losses)}/{len(configs)} configurations: {best} (loss {losses[best]:.5f})")
