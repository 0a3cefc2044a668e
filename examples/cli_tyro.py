"""A command line with tyro: your options and every Launcher field, documented, from type hints.

Run:  python examples/cli_tyro.py --workers-per-host 2 --backend gloo --lr 0.1
      python examples/cli_tyro.py --help              # every option, with its docstring as help
      python examples/cli_tyro.py --hostnames node1 node2 --ssh-config-file ~/.ssh/config

``torchrunx.Launcher`` is a dataclass whose fields have docstrings, so tyro turns it into options
(``--hostnames``, ``--workers-per-host``, ``--backend``, ...). ``tyro.conf.arg(name="")`` puts
them at the top level instead of under ``--launcher.``. For the launcher alone,
``tyro.cli(torchrunx.Launcher)`` is enough.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated

import torch
import torch.distributed as dist
import tyro

import torchrunx  # noqa: TC001 -- tyro reads the annotations at runtime


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


def main(
    launcher: Annotated[torchrunx.Launcher, tyro.conf.arg(name="")],
    lr: float = 0.5,
    steps: int = 100,
) -> None:
    """Train on the hosts and workers given on the command line.

    Args:
        launcher: Where and how to run.
        lr: Learning rate.
        steps: Training steps.
    """
    with launcher:
        result = launcher.run(train, lr=lr, steps=steps)
    print(f"{len(result)} workers on {list(result.by_hostname())}: w = {result.rank(0):.4f}")


if __name__ == "__main__":
    tyro.cli(main)
