"""A rank that skips one all_reduce (NCCL, 2 GPUs): the error says where each rank was.

Run on a machine with 2 GPUs: ``python benchmarks/gpu/nccl_hang.py`` (see RESULTS.md).
"""

import subprocess
import time

import torch
import torch.distributed as dist

import torchrunx
from torchrunx.stack_report import report


def train(steps: int) -> float:
    """All-reduce ``steps`` times, except that rank 1 skips the last one."""
    x = torch.ones(1 << 20, device="cuda")
    for step in range(steps):
        if dist.get_rank() == 1 and step == steps - 1:
            break  # skips the last all_reduce
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    return x[0].item()


def main() -> None:
    """The hang until NCCL's watchdog ends it, then the same hang asked for its stacks."""
    start = time.time()
    try:
        torchrunx.Launcher(worker_timeout=10).run(train, 5)
    except torchrunx.WorkerFailedError as e:
        print(f"after {time.time() - start:.1f} s: {type(e).__name__}: {str(e)[:300]}")
        print("\n".join(getattr(e, "__notes__", [])))
        print("stacks of ranks:", sorted(getattr(e, "stacks", {})))
    start = time.time()
    with torchrunx.Launcher() as launcher:
        handle = launcher.submit(train, 5)
        time.sleep(8)
        stacks = handle.stacks()
        print(f"on demand ({time.time() - start:.1f} s in):\n" + report(stacks))
        handle.cancel()
        print("cancelled; autopsy:\n" + handle.autopsy())
    query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv"]
    print(subprocess.run(query, capture_output=True, text=True, check=False).stdout)


if __name__ == "__main__":
    main()
