"""Worker script of the ``torchrun`` scenarios.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 torchrun_worker.py MODE DIR [ARG]``
where MODE is one of ``noop``, ``sleep`` (ARG: seconds), ``sigkill``, ``raise_in_barrier``,
``raise_late_in_barrier``, ``gpt2_loss`` or ``print_lines`` (ARG: how many lines).
"""

from __future__ import annotations

import sys

import torch.distributed as dist
import workloads


def main(argv: list[str]) -> None:
    """Join the process group, run one workload, leave the group."""
    mode, stamp_dir, *rest = argv
    dist.init_process_group(backend="gloo")
    if mode == "noop":
        workloads.noop()
    elif mode == "sleep":
        workloads.sleep(float(rest[0]))
    elif mode == "sigkill":
        workloads.sigkill_rank1(stamp_dir)
    elif mode == "raise_in_barrier":
        workloads.raise_in_barrier(stamp_dir)
    elif mode == "raise_late_in_barrier":
        workloads.raise_late_in_barrier(stamp_dir)
    elif mode == "gpt2_loss":
        workloads.gpt2_loss()
    elif mode == "print_lines":
        workloads.print_lines(stamp_dir, int(rest[0]))
    else:
        msg = f"unknown mode: {mode}"
        raise SystemExit(msg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
