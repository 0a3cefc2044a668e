"""Several hosts: DDP training on every worker of every host, then evaluation on one worker.

Run:  python examples/multihost.py --hostnames node1 node2 --workers-per-host 2
      python examples/multihost.py --hostnames node1 node2 --ssh-config-file my_ssh_config
      python examples/multihost.py --help             # every torchrunx option
      sbatch examples/slurm_batch.sh                  # inside a SLURM job: --hostnames slurm

Hosts are reached over SSH as your ssh config says (default ``~/.ssh/config``); they need this
Python and this working directory at the same paths (a shared filesystem). Workers use
``cuda:LOCAL_RANK`` and NCCL where there are GPUs, the CPU and gloo where there are none (the
``"auto"`` defaults). With no options it runs where ``--hostnames auto`` points: the SLURM
allocation's nodes, else this machine.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from torchrunx.integrations.cli import add_torchrunx_argument_group, launcher_from_args


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def make_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.arange(1.0, 9.0) - 2.0).unsqueeze(1)


def train(steps: int) -> dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = device()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1).to(dev))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = make_data()
    x, y = x[rank::world].to(dev), y[rank::world].to(dev)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "host": socket.gethostname(),
        "rank": rank,
        "device": str(dev),
        # CPU tensors: the launcher needs no GPU to receive them
        "weights": {k: v.cpu() for k, v in model.module.state_dict().items()},
    }


def evaluate(weights: dict[str, torch.Tensor]) -> tuple[str, float]:
    model = torch.nn.Linear(8, 1).to(device())
    model.load_state_dict(weights)
    x, y = make_data()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(x.to(device())), y.to(device())).item()
    return socket.gethostname(), mse


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    add_torchrunx_argument_group(parser)
    args = parser.parse_args()

    with launcher_from_args(args) as launcher:
        result = launcher.run(train, steps=args.steps)
        for hostname, values in result.by_hostname().items():
            where = ", ".join(f"rank {v['rank']} on {v['host']} ({v['device']})" for v in values)
            print(f"{hostname}: {where}")
        first = next(iter(result.by_hostname()))
        # one worker of the first host, served by the agent already running there
        host, mse = launcher.view([first], 1).run(evaluate, result.rank(0)["weights"]).rank(0)
    print(f"trained on {len(result)} workers of {len(result.by_hostname())} hosts")
    print(f"evaluated on {host}: mean squared error {mse:.5f}")
