"""Retries: a worker dies mid-training, the launcher catches WorkerFailedError and resumes.

Run:  python examples/retries.py [--workers 2] [--steps 60] [--crashes 1] [--checkpoint-dir ckpt]

Training checkpoints every ``--save-every`` steps. In each of the first ``--crashes`` attempts, the
last rank kills itself with SIGKILL partway through (as the kernel's OOM killer or a preempted
node would). ``run`` then raises :class:`torchrunx.WorkerFailedError` naming the host, rank and
signal, after every other process of that run is gone; the next attempt starts fresh workers on
the same launcher and resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrunx


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.arange(1.0, 9.0)).unsqueeze(1)


def train(
    checkpoint_dir: str, steps: int, save_every: int, crash: bool, resume_from_checkpoint: bool
) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    path = Path(checkpoint_dir) / "last.pt"
    first = 0
    if resume_from_checkpoint and path.exists():
        state = torch.load(path, weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["step"]
        if rank == 0:
            print(f"resuming from step {first}")
    x, y = make_data()
    x, y = x[rank::world], y[rank::world]
    for step in range(first, steps):
        if crash and rank == world - 1 and step == first + save_every + save_every // 2:
            os.kill(os.getpid(), signal.SIGKILL)  # an intermittent failure
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step + 1) % save_every == 0:
            state = {
                "model": model.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step + 1,
            }
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)  # atomic: a crash never leaves half a checkpoint
            print(f"step {step + 1}: loss {loss.item():.4f}, checkpoint saved")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint interval")
    parser.add_argument("--crashes", type=int, default=1, help="attempts that crash (default: 1)")
    parser.add_argument("--retries", type=int, default=3, help="attempts at most (default: 3)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="(default: checkpoints)")
    args = parser.parse_args()
    Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.checkpoint_dir) / "last.pt").unlink(missing_ok=True)  # start from scratch

    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=args.workers, backend="gloo"
    ) as launcher:
        for retry in range(args.retries):
            try:
                loss = launcher.run(
                    train,
                    checkpoint_dir=args.checkpoint_dir,
                    steps=args.steps,
                    save_every=args.save_every,
                    crash=retry < args.crashes,
                    resume_from_checkpoint=True,
                ).rank(0)
            except torchrunx.WorkerFailedError as e:  # noqa: PERF203 -- one try per attempt
                print(f"Error occurred: {e}")
                print(f"Retrying ({retry}) ...")
            else:  # if run() is successful
                print(f"finished after {retry + 1} attempts: loss {loss:.4f}")
                break
        else:
            msg = f"gave up after {args.retries} attempts"
            raise SystemExit(msg)
