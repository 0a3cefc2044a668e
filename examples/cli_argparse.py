"""A command line with argparse: your options plus one option per Launcher field.

Run:  python examples/cli_argparse.py --workers-per-host 2 --backend gloo --lr 0.1
      python examples/cli_argparse.py --help          # every torchrunx option, with its help
      python examples/cli_argparse.py --hostnames node1 node2 --ssh-config-file ~/.ssh/config

``add_torchrunx_argument_group`` adds ``--hostnames``, ``--workers-per-host``, ``--backend``, ...
(defaults: those of ``torchrunx.Launcher()``), and ``launcher_from_args`` builds the launcher
they describe.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist

from torchrunx.integrations.cli import add_torchrunx_argument_group, launcher_from_args


def train(lr: float, steps: int) -> float:
    """Fit y = 3x with one weight shared by every worker (gradients averaged by all_reduce)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    print(
        f"rank {rank} of {world} on {socket.gethostname()}, LOCAL_RANK {os.environ['LOCAL_RANK']}"
    )
    w = torch.zeros(1, requires_grad=True)
    x = torch.linspace(-1.0, 1.0, 64)[rank::world]
    for _ in range(steps):
        loss = ((w * x - 3 * x) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, w)
        dist.all_reduce(grad)  # summed over the workers: divide for the mean
        with torch.no_grad():
            w -= lr * grad / world
    return w.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate (default: 0.5)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    add_torchrunx_argument_group(parser)  # --hostnames, --workers-per-host, ... with help
    args = parser.parse_args()

    with launcher_from_args(args) as launcher:
        result = launcher.run(train, lr=args.lr, steps=args.steps)
    print(f"{len(result)} workers on {list(result.by_hostname())}: w = {result.rank(0):.4f}")
