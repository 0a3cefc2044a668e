"""A sweep's run on devices of its own: the worker's side of ``Devices`` (transport.messages).

A host of a sweep has as many slots as the launcher's ``workers_per_host`` there. On a host with
GPUs slot ``k`` is its ``k``-th visible GPU: a run sees only its own (``CUDA_VISIBLE_DEVICES``),
so its ``LOCAL_RANK`` 0 is its first GPU, as under torchrun. On a host without, slot ``k`` is the
``k``-th of as many equal groups of the cores the agent may use: the run's processes are pinned to
its groups (``sched_setaffinity``) and torch and OpenMP use as many threads per rank as the run
has cores per rank. Applied in each worker before the function, before CUDA starts.
"""

from __future__ import annotations

__all__ = ["apply", "core_groups"]

import os
import sys
from typing import TYPE_CHECKING

from .hosts import count_gpus

if TYPE_CHECKING:
    from .transport.messages import Devices

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def apply(devices: Devices | None, ranks: int) -> None:
    """In a worker of a run of ``ranks`` ranks on this host: keep to the run's ``devices``."""
    if devices is None:
        return
    gpus = count_gpus()
    if gpus:
        visible = _visible_gpus(gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[s % gpus] for s in devices.slots)
        return
    groups = core_groups(sorted(os.sched_getaffinity(0)), devices.of)
    cores = sorted({c for s in devices.slots for c in groups[s % len(groups)]})
    os.sched_setaffinity(0, cores)
    threads = str(max(1, len(cores) // max(1, ranks)))
    os.environ.update(dict.fromkeys(_THREAD_VARS, threads))
    torch = sys.modules.get("torch")  # imported by the forkserver, its pool made before this
    if torch is not None:
        torch.set_num_threads(int(threads))


def core_groups(cores: list[int], slots: int) -> list[list[int]]:
    """``cores`` in ``slots`` groups as equal as can be, neighbours together (caches, NUMA).

    With fewer cores than slots, slots share cores, one each, round the cores.
    """
    if slots <= len(cores):
        size, extra = divmod(len(cores), slots)
        bounds = [k * size + min(k, extra) for k in range(slots + 1)]
        return [cores[bounds[k] : bounds[k + 1]] for k in range(slots)]
    return [[cores[k % len(cores)]] for k in range(slots)]


def _visible_gpus(gpus: int) -> list[str]:
    """The ids this process's CUDA would number 0..gpus-1 (the launcher's own restriction kept)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(k) for k in range(gpus)]
    return [entry.strip() for entry in visible.split(",")][:gpus]
