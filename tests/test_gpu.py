"""GPU tests: NCCL by default, a device per LOCAL_RANK, CUDA results, memory isolation, CUDA errors.

Run on a machine with NVIDIA GPUs: ``python -m pytest -m gpu tests/test_gpu.py -rA``. Without a
GPU every test here is skipped. The pytest process (the launcher) may initialise CUDA; the agents
and forkservers never do, which is what makes forking fresh workers that use CUDA safe.

Each test prints what it observed (shown with ``-rA``); benchmarks/gpu/RESULTS.md records a run.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import torch

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available())"
    ),
]

NVIDIA_SMI = shutil.which("nvidia-smi") or "/usr/bin/nvidia-smi"
GIB = 1 << 30
FILL_GIB_MAX = 60
"""The isolation test fills this much GPU memory, or 75 % of the GPU's memory if that is less."""
RELEASE_WAIT_S = 10.0
REINIT_MESSAGE = "Cannot re-initialize CUDA in forked subprocess"
SEEN_ERRORS: list[str] = []
"""Every error text a test saw; the last test checks none of them is a CUDA re-initialisation."""


# ---------------------------------------------------------------- helpers (launcher side)


def _gpu_count() -> int:
    return torch.cuda.device_count()


def gpu_holders() -> list[tuple[int, int]]:
    """``[(pid, used MiB)]`` of every process holding GPU memory, as nvidia-smi reports them."""
    out = subprocess.run(
        [NVIDIA_SMI, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    holders = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit():
            used = int(fields[1]) if fields[1].isdigit() else -1
            holders.append((int(fields[0]), used))
    return holders


def foreign_holders() -> list[tuple[int, int]]:
    """GPU holders other than this pytest process (the launcher, which may use CUDA)."""
    return [(pid, mib) for pid, mib in gpu_holders() if pid != os.getpid()]


def wait_gpu_released(timeout: float = RELEASE_WAIT_S) -> tuple[list[tuple[int, int]], float]:
    """Wait until no process but this one holds GPU memory: ``(holders left, seconds waited)``."""
    start = time.monotonic()
    while True:
        left = foreign_holders()
        waited = time.monotonic() - start
        if not left or waited > timeout:
            return left, waited
        time.sleep(0.1)


def our_agent_pids() -> dict[int, str]:
    """Agents and forkservers of this pytest process (``python -m torchrunx[.forkserver]``)."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "torchrunx" in cmd:
            found[p.pid] = cmd
    return found


def gpu_memory_total_mib() -> int:
    out = subprocess.run(
        [NVIDIA_SMI, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return int(out.strip().splitlines()[0])


def _record(e: BaseException) -> str:
    text = f"{type(e).__module__}.{type(e).__qualname__}: {e}"
    cause = e.__cause__
    if cause is not None:
        text += f"\n  caused by {type(cause).__qualname__}: {cause}"
    notes = getattr(e, "__notes__", None)
    if notes:
        text += "\n  notes: " + " | ".join(notes)
    last = getattr(e, "last_lines", None)
    if last:
        text += "\n  last lines: " + " | ".join(last)
    SEEN_ERRORS.append(text)
    return text


@pytest.fixture(scope="module")
def log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "logs"


@pytest.fixture(scope="module")
def gpu_launcher(log_root: Path) -> Iterator[torchrunx.Launcher]:
    """``Launcher()`` with its defaults (hosts, workers and backend "auto"), agents kept warm.

    Without standby workers: the tests that use it check that no process holds GPU memory
    between runs (a standby set would: the next run's; see the standby test).
    """
    with torchrunx.Launcher(log_dir=str(log_root), standby=False) as launcher:
        yield launcher


@pytest.fixture(autouse=True)
def gpu_released_after_test() -> Iterator[None]:
    """After every test, no process but the launcher holds GPU memory (nvidia-smi)."""
    yield
    left, waited = wait_gpu_released()
    print(f"[after test] GPU holders besides the launcher: {left} (checked for {waited:.2f} s)")
    assert not left, f"processes still hold GPU memory after the run: {left}"


# ---------------------------------------------------------------- worker functions


def report_setup() -> dict[str, Any]:
    import torch.distributed as dist

    return {
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "rank": dist.get_rank(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "device_count": torch.cuda.device_count(),
    }


def use_local_rank_device() -> dict[str, Any]:
    local_rank = int(os.environ["LOCAL_RANK"])
    seen = {
        "bad_fork_at_entry": torch.cuda._is_in_bad_fork(),
        "initialized_at_entry": torch.cuda.is_initialized(),
        "current_device_before_set": torch.cuda.current_device(),
    }
    torch.cuda.set_device(local_rank)
    t = torch.ones(4, device="cuda") * (local_rank + 1)
    torch.cuda.synchronize()
    return {
        **seen,
        "local_rank": local_rank,
        "current_device": torch.cuda.current_device(),
        "tensor_device": t.device.index,
        "value": t.sum().item(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


def ddp_step(lr: float) -> dict[str, Any]:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    local_rank = int(os.environ["LOCAL_RANK"])
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    model = nn.Linear(4, 1, bias=False).to(device)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ddp = DistributedDataParallel(model, device_ids=[local_rank])
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    x = torch.full((2, 4), float(rank + 1), device=device)
    loss = ddp(x).sum()  # d loss / d w = sum over the batch of x = 2 * (rank + 1) per entry
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    ranks = torch.tensor([float(rank)], device=device)
    dist.all_reduce(ranks)
    return {
        "rank": rank,
        "world": world,
        "loss": loss.item(),
        "weight": model.weight.detach().cpu().flatten().tolist(),
        "rank_sum": ranks.item(),
    }


def cuda_tensors(n_large: int) -> dict[str, torch.Tensor]:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    rank = int(os.environ["RANK"])
    return {
        "small": torch.arange(10, device="cuda", dtype=torch.float32) * (rank + 1),
        "large": torch.full((n_large,), float(rank), device="cuda"),  # over 1 MiB: sent directly
    }


def fill_gpu(nbytes: int) -> dict[str, Any]:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    free_before, total = torch.cuda.mem_get_info()
    block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    block.fill_(7)
    torch.cuda.synchronize()
    out = subprocess.run(
        [NVIDIA_SMI, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        "pid": os.getpid(),
        "free_before_gib": free_before / GIB,
        "total_gib": total / GIB,
        "allocated_gib": torch.cuda.memory_allocated() / GIB,
        "checksum_ok": bool(block[-1].item() == 7),
        "holders_seen_by_worker": out.strip().splitlines(),
    }


def oom() -> None:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB


def device_side_assert() -> None:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    t = torch.zeros(10, device="cuda")
    index = torch.tensor([1000], device="cuda")
    t[index] += 1  # out of bounds on the device: the kernel asserts
    torch.cuda.synchronize()


def all_reduce_on_shared_gpu() -> dict[str, Any]:
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    device = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(device)
    t = torch.tensor([float(dist.get_rank() + 1)], device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    return {"local_rank": local_rank, "device": t.device.index, "sum": t.item()}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "options", [{}, {"workers_per_host": "gpu"}], ids=["defaults", "workers_per_host=gpu"]
)
def test_defaults_pick_gpu_count_and_nccl(options: dict[str, Any]) -> None:
    with torchrunx.Launcher(**options) as launcher:
        result = launcher.run(report_setup)
    values = result.by_rank()
    print(f"[{options or 'Launcher()'}] {values}")
    assert len(values) == _gpu_count()
    assert [v["rank"] for v in values] == list(range(_gpu_count()))
    for v in values:
        assert v["world_size"] == _gpu_count()
        assert v["backend"] == "nccl"
        assert v["device_count"] == _gpu_count()


def test_each_worker_uses_its_local_rank_device(gpu_launcher: torchrunx.Launcher) -> None:
    values = gpu_launcher.run(use_local_rank_device).by_rank()
    print(f"[LOCAL_RANK devices] {values}")
    for local_rank, v in enumerate(values):
        assert v["local_rank"] == local_rank
        assert v["current_device"] == local_rank
        assert v["tensor_device"] == local_rank
        assert v["value"] == 4.0 * (local_rank + 1)
        # forked from a forkserver that never initialised CUDA: this fork is a good one
        assert v["bad_fork_at_entry"] is False
    assert len({v["pid"] for v in values}) == len(values)


def test_ddp_training_step(gpu_launcher: torchrunx.Launcher) -> None:
    lr = 0.1
    values = gpu_launcher.run(ddp_step, lr).by_rank()
    print(f"[DDP step] {values}")
    world = _gpu_count()
    mean_grad = sum(2.0 * (r + 1) for r in range(world)) / world  # DDP averages the gradients
    for rank, v in enumerate(values):
        assert v["rank"] == rank
        assert v["world"] == world
        assert v["loss"] == pytest.approx(8.0 * (rank + 1))
        assert v["weight"] == pytest.approx([1.0 - lr * mean_grad] * 4)
        assert v["rank_sum"] == sum(range(world))


def test_cuda_tensor_results_are_usable_in_the_launcher(gpu_launcher: torchrunx.Launcher) -> None:
    n_large = 1 << 20  # 4 MiB of float32
    values = gpu_launcher.run(cuda_tensors, n_large).by_rank()
    for rank, v in enumerate(values):
        small, large = v["small"], v["large"]
        print(f"[CUDA results] rank {rank}: small on {small.device}, large on {large.device}")
        assert small.device.type == "cuda"
        assert small.device.index == rank % _gpu_count()
        assert large.device.type == "cuda"
        # usable: CUDA arithmetic in the launcher gives the values the worker made
        assert torch.equal(small * 2, torch.arange(10, device=small.device) * 2.0 * (rank + 1))
        assert large.shape == (n_large,)
        assert float(large.sum().item()) == float(rank) * n_large


NO_GPU_LAUNCHER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torchrunx

    def cuda_result():
        return torch.arange(4, device="cuda") + 1

    def cpu_result():
        return (torch.arange(4, device="cuda") + 1).cpu()

    out = {"launcher_cuda_available": torch.cuda.is_available()}
    # the launcher sees no GPU; its agent and workers see GPU 0
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=1,
        extra_env_vars={"CUDA_VISIBLE_DEVICES": "0"}, log_dir=sys.argv[1],
    ) as launcher:
        try:
            value = launcher.run(cuda_result).rank(0)
            out["cuda_result"] = {"ok": repr(value)}
        except Exception as e:
            out["cuda_result"] = {
                "type": f"{type(e).__module__}.{type(e).__qualname__}",
                "message": str(e),
                "cause": None if e.__cause__ is None else
                    f"{type(e.__cause__).__qualname__}: {e.__cause__}",
            }
        out["cpu_result_after"] = repr(launcher.run(cpu_result).rank(0))
    print("RESULT " + json.dumps(out))
    """
)


def test_cuda_result_when_the_launcher_has_no_gpu(log_root: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", NO_GPU_LAUNCHER, str(log_root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    SEEN_ERRORS.append(proc.stderr)
    assert proc.returncode == 0
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["launcher_cuda_available"] is False
    failure = out["cuda_result"]
    SEEN_ERRORS.append(json.dumps(failure))
    # a CUDA tensor pickled by torch needs CUDA to be unpickled: a clear error, not a hang
    assert failure.get("type") == "torchrunx.errors.WorkerFailedError", failure
    assert "cannot be unpickled in the launcher" in failure["message"]
    assert "CUDA" in failure["message"]
    # moving the result to the CPU in the worker is the way: the same launcher then works
    assert out["cpu_result_after"] == "tensor([1, 2, 3, 4])"


def test_fill_gpu_memory_twice_and_release_it(gpu_launcher: torchrunx.Launcher) -> None:
    nbytes = min(FILL_GIB_MAX * GIB, int(gpu_memory_total_mib() * 0.75) << 20)
    agents = our_agent_pids()
    assert agents, "the warm launcher's agent and forkserver should be running"
    print(f"[fill] {nbytes / GIB:.1f} GiB per run; agents and forkservers: {agents}")
    for attempt in (1, 2):
        before = foreign_holders()
        assert not before, f"GPU memory held before run {attempt}: {before}"
        start = time.monotonic()
        value = gpu_launcher.run(fill_gpu, nbytes).rank(0)
        elapsed = time.monotonic() - start
        left, waited = wait_gpu_released()
        print(f"[fill run {attempt}] {elapsed:.2f} s: {value}")
        print(f"[fill run {attempt}] holders after: {left} (checked for {waited:.2f} s)")
        assert value["allocated_gib"] >= nbytes / GIB
        assert value["checksum_ok"]
        # nvidia-smi sees the worker itself holding the memory while it runs...
        held = {int(x.split(",")[0]) for x in value["holders_seen_by_worker"]}
        assert value["pid"] in held
        # ...never an agent or a forkserver, and nobody once run() has returned
        assert not held & set(agents), f"an agent or forkserver holds GPU memory: {held}"
        assert not left, f"GPU memory still held after run {attempt}: {left}"
        assert not psutil.pid_exists(value["pid"]) or (
            psutil.Process(value["pid"]).status() == psutil.STATUS_ZOMBIE
        )
    assert set(our_agent_pids()) == set(agents), "the same warm agents served both runs"


def test_out_of_memory_is_raised_with_its_type(gpu_launcher: torchrunx.Launcher) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        gpu_launcher.run(oom)
    print(f"[OOM] {_record(info.value)}")
    assert "out of memory" in str(info.value).lower()
    # the launcher goes on: the next run on the GPU works
    assert gpu_launcher.run(use_local_rank_device).rank(0)["value"] == 4.0


def test_device_side_assert_is_a_clear_error(gpu_launcher: torchrunx.Launcher) -> None:
    start = time.monotonic()
    with pytest.raises((RuntimeError, torchrunx.WorkerFailedError)) as info:
        gpu_launcher.run(device_side_assert)
    elapsed = time.monotonic() - start
    text = _record(info.value)
    print(f"[device-side assert] raised after {elapsed:.2f} s: {text}")
    assert "device-side assert" in text or "CUDA error" in text
    assert gpu_launcher.run(use_local_rank_device).rank(0)["value"] == 4.0


def test_two_workers_share_one_gpu_with_gloo(log_root: Path) -> None:
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir=str(log_root)
    ) as launcher:
        values = launcher.run(all_reduce_on_shared_gpu).by_rank()
    print(f"[2 workers, gloo, CUDA tensors] {values}")
    assert [v["local_rank"] for v in values] == [0, 1]
    assert [v["device"] for v in values] == [r % _gpu_count() for r in (0, 1)]
    assert all(v["sum"] == 3.0 for v in values)


def sweep_item_on_its_gpu(item: int, gib: float = 4.0) -> dict[str, Any]:
    """A sweep's run: what it sees of the GPUs, and memory it holds until it returns."""
    entered = time.time()
    block = torch.empty(int(gib * GIB), dtype=torch.uint8, device="cuda")
    block.fill_(item % 256)
    torch.cuda.synchronize()
    time.sleep(0.3)
    return {
        "item": item,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_count": torch.cuda.device_count(),
        "local_rank": os.environ["LOCAL_RANK"],
        "uuid": str(torch.cuda.get_device_properties(0).uuid),
        "pid": os.getpid(),
        "entered": entered,
        "left": time.time(),
        "ok": bool(block[-1].item() == item % 256),
    }


def test_a_sweep_runs_one_item_per_gpu_and_frees_it_between_runs(log_root: Path) -> None:
    gpus = _gpu_count()
    items = list(range(2 * gpus + 1))  # more than the slots: a queue
    with torchrunx.Launcher(workers_per_host="gpu", log_dir=str(log_root)) as launcher:
        sweep = launcher.sweep(sweep_item_on_its_gpu, items, progress=False)
        outcomes = sweep.outcomes()
        left, waited = wait_gpu_released()
    values = [o.rank(0) for _, o in outcomes]  # type: ignore[union-attr]
    print(f"[sweep on {gpus} GPU(s)] {[(v['item'], v['visible']) for v in values]}")
    print(f"[sweep] most in flight {sweep.most_in_flight}; holders after: {left} ({waited:.2f} s)")
    assert [v["item"] for v in values] == items
    assert all(v["ok"] and v["device_count"] == 1 and v["local_rank"] == "0" for v in values)
    assert {v["visible"] for v in values} == {str(g) for g in range(gpus)}
    assert sweep.most_in_flight == gpus
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for v in values:
        by_gpu.setdefault(v["visible"], []).append(v)
    for runs in by_gpu.values():  # one run at a time on a GPU, each in a fresh process
        runs.sort(key=lambda v: v["entered"])
        assert all(a["left"] <= b["entered"] for a, b in itertools.pairwise(runs))
        assert len({v["pid"] for v in runs}) == len(runs)
    assert not left, f"GPU memory still held after the sweep: {left}"


def timed_all_reduce() -> dict[str, Any]:
    """A run's first collective on its GPU, timed: fast where the communicator is ready."""
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    t = torch.ones(1 << 20, device="cuda")
    start = time.perf_counter()
    dist.all_reduce(t)
    torch.cuda.synchronize()
    return {"pid": os.getpid(), "first_collective_s": time.perf_counter() - start}


def test_standby_workers_have_their_communicator_ready(log_root: Path) -> None:
    with torchrunx.Launcher(log_dir=str(log_root)) as launcher:
        launcher.run(timed_all_reduce)
        deadline = time.monotonic() + 60
        status = launcher.standby_status()
        while time.monotonic() < deadline and not (
            status and all(s.state == "standby" for s in status.values())
        ):
            time.sleep(0.1)
            status = launcher.standby_status()
        assert status is not None
        ready = {s.pid for s in status.values()}
        held = {pid: mib for pid, mib in gpu_holders() if pid in ready}
        print(f"[standby] {dict(status)}; GPU memory held while waiting (MiB): {held}")
        assert set(held) == ready  # each holds its CUDA context and communicator, and says so
        assert all(s.gpu_memory for s in status.values())
        start = time.monotonic()
        values = launcher.run(timed_all_reduce).by_rank()
        elapsed = time.monotonic() - start
    left, _ = wait_gpu_released()  # the launcher closed: its next standby set too
    print(f"[standby run] {elapsed * 1e3:.0f} ms, first collective {values}; after: {left}")
    assert {v["pid"] for v in values} == ready  # the standby path
    assert max(v["first_collective_s"] for v in values) < 0.5  # no communicator made here
    assert not left, f"GPU memory still held after close: {left}"


def test_no_process_reinitialised_cuda_in_a_fork(log_root: Path) -> None:
    logs = [p for p in log_root.rglob("*") if p.is_file()]
    print(f"[re-init] {len(logs)} log files under {log_root}, {len(SEEN_ERRORS)} errors seen")
    assert logs, "the runs above should have written logs"
    for path in logs:
        assert REINIT_MESSAGE not in path.read_text(errors="replace"), path
    for text in SEEN_ERRORS:
        assert REINIT_MESSAGE not in text
