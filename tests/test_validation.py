"""Bad configuration is refused at once, with the bad value and what would be accepted."""

from __future__ import annotations

import os
from typing import Any

import pytest

import torchrunx


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"hostnames": "everywhere"}, ValueError, ["everywhere", "auto", "slurm"]),
        ({"hostnames": []}, ValueError, ["at least one"]),
        ({"hostnames": ["localhost", 3]}, TypeError, ["hostname"]),
        ({"workers_per_host": 0}, ValueError, ["0", "positive"]),
        ({"workers_per_host": "tpu"}, ValueError, ["tpu", "gpu", "cpu"]),
        ({"workers_per_host": [2, -1]}, ValueError, ["-1", "positive"]),
        ({"workers_per_host": 2.5}, TypeError, ["2.5"]),
        ({"backend": "nccl2"}, ValueError, ["nccl2", "gloo"]),
        ({"worker_timeout": -5}, ValueError, ["worker_timeout", "-5"]),
        ({"agent_timeout": 0}, ValueError, ["agent_timeout"]),
        ({"copy_env_vars": "PATH"}, TypeError, ["copy_env_vars", "tuple"]),
        ({"extra_env_vars": {"A": 1}}, TypeError, ["extra_env_vars", "str"]),
        ({"env_file": "/nonexistent/env"}, ValueError, ["/nonexistent/env"]),
    ],
)
def test_bad_fields(fields: dict[str, Any], error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        torchrunx.Launcher(**fields)
    for word in words:
        assert word in str(info.value)


def test_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="only once"):
        torchrunx.Launcher(hostnames=["localhost", "localhost"])
    with pytest.raises(ValueError, match="2 entries for 1 hosts"):
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=[1, 2])
    with pytest.raises(TypeError, match="callable"):
        torchrunx.Launcher().run(42)  # type: ignore[arg-type]


def test_gpu_workers_without_gpus_is_a_clear_error() -> None:
    with torchrunx.Launcher(workers_per_host="gpu") as lau, pytest.raises(ValueError, match="GPU"):
        lau.run(os.getpid)


def test_slurm_outside_an_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    with pytest.raises(RuntimeError, match="SLURM"):  # as torchrunx 0.4 documents
        torchrunx.Launcher(hostnames="slurm").run(os.getpid)
    with pytest.raises(ValueError, match='agent_start="srun" needs a SLURM allocation'):
        torchrunx.Launcher(agent_start="srun")
    with pytest.raises(ValueError, match="agent_start='rsh'"):
        torchrunx.Launcher(agent_start="rsh")  # type: ignore[arg-type]


def test_bad_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_LEVEL", "LOUD")
    with (
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau,
        pytest.raises(ValueError, match="LOUD"),
    ):
        lau.run(os.getpid)


def _one_arg(x: int) -> int:
    return x


def test_a_call_that_does_not_fit_the_signature_fails_before_anything_starts() -> None:
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2)
    with pytest.raises(TypeError, match=r"_one_arg\(x\) cannot be called with these arguments"):
        launcher.run(_one_arg, 1, 2)
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        launcher.submit(_one_arg)
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        launcher.run(_one_arg, 1, y=2)
    assert launcher._pool is None  # no agent, no worker started


def test_an_argument_that_cannot_be_pickled_is_named() -> None:
    import threading

    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2)
    with pytest.raises(TypeError, match="argument 'x' of _one_arg, a lock, cannot be pickled"):
        launcher.run(_one_arg, x=threading.Lock())
    with pytest.raises(TypeError, match="positional argument 0 of _one_arg, a lock"):
        launcher.run(_one_arg, threading.Lock())
    lock = threading.Lock()

    def holds_a_lock() -> bool:
        return lock.locked()

    with pytest.raises(TypeError, match=r"the function of .*holds_a_lock, a function"):
        launcher.run(holds_a_lock)
    assert launcher._pool is None
