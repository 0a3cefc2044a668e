"""Hosts and their facts: hostnames, SLURM, local addresses, GPU and CPU counts.

The addresses that connect us and a host (``route_to()``) are the transport's: they are
named here beside the other facts.

GPUs are counted from the driver's files, never through CUDA: a process that initialised CUDA
cannot fork usable children, and agents and forkservers fork.
"""

from __future__ import annotations

__all__ = [
    "SLURM_JOB_VARS",
    "count_gpus",
    "gpu_memory_by_pid",
    "in_slurm_job",
    "interface_of",
    "is_local",
    "local_facts",
    "requeue_job",
    "resolve_hostnames",
    "route_to",
    "slurm_hostnames",
    "slurm_job_vars",
]

import contextlib
import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from .transport.messages import HostFacts
from .transport.routes import route_to  # the pool's, beside the other facts of hosts

_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}


def in_slurm_job() -> bool:
    """Whether this process runs inside a SLURM allocation."""
    return "SLURM_JOB_ID" in os.environ or "SLURM_JOBID" in os.environ


SLURM_JOB_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")
"""What every worker of a run inside a SLURM job is told of it: the job, and its attempt."""
REQUEUE_TIMEOUT_S = 30.0
REQUEUED_ALREADY = "Job is pending execution"  # scontrol's words: SLURM requeued it first


def slurm_job_vars() -> dict[str, str]:
    """The launcher's ``SLURM_JOB_VARS`` that are set (none outside a job)."""
    return {k: os.environ[k] for k in SLURM_JOB_VARS if k in os.environ}


def requeue_job() -> str | None:
    """Requeue this SLURM job (``scontrol requeue``); why it failed, or None.

    None too where SLURM requeued the job first (a partition's preemption whose grace ended):
    the job is pending again, which is what was asked.
    """
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID", "")
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job],  # noqa: S607 -- SLURM's own, from PATH
            capture_output=True,
            text=True,
            check=False,
            timeout=REQUEUE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job}: {e}"
    if done.returncode != 0 and REQUEUED_ALREADY not in done.stderr:
        return f"scontrol requeue {job}: {done.stderr.strip() or f'exit {done.returncode}'}"
    return None


def slurm_hostnames() -> list[str]:
    """Hostnames of the current SLURM allocation (``scontrol show hostnames``).

    Raises ``RuntimeError`` outside an allocation, as torchrunx 0.4 documents.
    """
    if not in_slurm_job():
        msg = 'hostnames="slurm" needs a SLURM allocation, but SLURM_JOB_ID is not set'
        raise RuntimeError(msg)
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        msg = 'hostnames="slurm": SLURM_JOB_ID is set but scontrol is not on PATH'
        raise RuntimeError(msg)
    out = subprocess.run(
        [scontrol, "show", "hostnames"], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.split()


def resolve_hostnames(hostnames: list[str] | str) -> list[str]:
    """``"auto"``: the SLURM allocation's nodes or ``["localhost"]``; ``"slurm"``; or a list."""
    if hostnames == "auto":
        return slurm_hostnames() if in_slurm_job() else ["localhost"]
    if hostnames == "slurm":
        return slurm_hostnames()
    return list(hostnames)


@cache
def _own_addresses() -> frozenset[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    addresses: set[str] = set()
    for name in names:
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(name, None)
            addresses |= {info[4][0] for info in infos if isinstance(info[4][0], str)}
    import psutil  # noqa: PLC0415

    for addrs in psutil.net_if_addrs().values():
        addresses |= {a.address.split("%")[0] for a in addrs if a.family in (2, 10)}
    return frozenset(names | addresses | _LOCAL_NAMES)


def is_local(hostname: str) -> bool:
    """Whether ``hostname`` names this machine (so no SSH is needed to reach it)."""
    return hostname in _LOCAL_NAMES or hostname in _own_addresses()


def count_gpus() -> int:
    """NVIDIA GPUs visible to this process, without initialising CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus_dir = Path("/proc/driver/nvidia/gpus")
    present = len(list(gpus_dir.iterdir())) if gpus_dir.is_dir() else 0
    if present == 0:
        present = sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    if visible is None:
        # in a SLURM step without GPU binding, the allocation's share of this node's GPUs
        share = os.environ.get("SLURM_GPUS_ON_NODE", "")
        return min(present, int(share)) if share.isdigit() else present
    count = 0
    for entry in visible.split(","):
        # CUDA stops at the first invalid entry ("-1" is the usual way to hide all GPUs)
        if not entry.strip() or entry.strip().startswith("-"):
            break
        count += 1
    return min(count, present)


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (an IP or a name) on this host, if one does."""
    import psutil  # noqa: PLC0415

    try:
        wanted = {str(info[4][0]) for info in socket.getaddrinfo(address, None)}
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in wanted for a in addrs):
            return str(name)
    return None


def local_facts(folder: str) -> HostFacts:
    """What an agent tells the launcher about its host in its ``hello``."""
    return HostFacts(
        pid=os.getpid(),
        hostname=socket.gethostname(),
        gpus=count_gpus(),
        cpus=len(os.sched_getaffinity(0)),
        python=sys.executable,
        dir=folder,
    )


class _NvmlProcess(ctypes.Structure):
    """``nvmlProcessInfo_t`` (v2 and later): a process on a GPU and the memory it holds."""

    _fields_ = (
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    )


_NOT_AVAILABLE = 1 << 63  # NVML's "no value" (all bits set) and anything that large


@cache
def _nvml() -> Any:
    """NVIDIA's management library (what nvidia-smi uses): it never initialises CUDA."""
    with contextlib.suppress(OSError, AttributeError):
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() == 0:
            return lib
    return None


def gpu_memory_by_pid() -> dict[int, int] | None:
    """Bytes of GPU memory each process holds, on every GPU of this host; None without NVML."""
    lib = _nvml()
    if lib is None:
        return None
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return None
    held: dict[int, int] = {}
    for index in range(count.value):
        device = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(device)) != 0:
            continue
        size = ctypes.c_uint(64)
        procs = (_NvmlProcess * size.value)()
        if lib.nvmlDeviceGetComputeRunningProcesses_v3(device, ctypes.byref(size), procs) != 0:
            continue
        for proc in procs[: size.value]:
            used = proc.usedGpuMemory if proc.usedGpuMemory < _NOT_AVAILABLE else 0
            held[proc.pid] = held.get(proc.pid, 0) + used
    return held
