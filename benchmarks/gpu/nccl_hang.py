"""A rank that skips one all_reduce (NCCL, 2 GPUs): the error says where each rank was."""
import os, time
import torch
import torch.distributed as dist
import torchrunx


def train(steps: int) -> float:
    x = torch.ones(1 << 20, device="cuda")
    for step in range(steps):
        if dist.get_rank() == 1 and step == steps - 1:
            break  # skips the last all_reduce
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    return x[0].item()


if __name__ == "__main__":
    t = time.time()
    try:
        torchrunx.Launcher(worker_timeout=10).run(train, 5)
    except Exception as e:
        print(f"after {time.time() - t:.1f} s: {type(e).__name__}: {str(e)[:300]}")
        print("\n".join(getattr(e, "__notes__", [])))
        print("stacks of ranks:", sorted(getattr(e, "stacks", {})))
    t = time.time()
    with torchrunx.Launcher() as l:
        h = l.submit(train, 5)
        time.sleep(8)
        from torchrunx.stacks import report
        st = h.stacks()
        print(f"on demand ({time.time() - t:.1f} s in):\n" + report(st))
        h.cancel()
        print("cancelled; autopsy:\n" + h.autopsy())
    print(os.popen("nvidia-smi --query-gpu=index,memory.used --format=csv").read())
