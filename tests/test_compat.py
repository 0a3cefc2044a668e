"""Code written for torchrunx 0.4 runs unchanged: its import paths, log folders, integrations.

Each test does what 0.4's manual, examples or CI tests do, as they do it: the Lightning and
accelerate integrations in real training runs on 2 gloo workers, tyro on a function with a
nested ``launcher: torchrunx.Launcher`` argument, the logging helpers on a real run.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest
import torch

import torchrunx
import torchrunx.logs

if TYPE_CHECKING:
    from pathlib import Path

# Every import path that 0.4's manual, README and examples use.
DOCUMENTED_0_4_IMPORTS = {
    "torchrunx": [
        "Launcher",
        "LaunchResult",
        "AgentFailedError",
        "WorkerFailedError",
        "DEFAULT_ENV_VARS_FOR_COPY",
        "launch",
    ],
    "torchrunx.utils.log_handling": [
        "RedirectHandler",
        "get_handler_filter",
        "default_handlers",
        "file_handlers",
    ],
    "torchrunx.integrations.parsing": ["add_torchrunx_argument_group", "launcher_from_args"],
    "torchrunx.integrations.cli": ["add_torchrunx_argument_group", "launcher_from_args"],
    "torchrunx.integrations.lightning": ["TorchrunxClusterEnvironment"],
}


def two_workers(backend: str | None = "gloo") -> torchrunx.Launcher:
    return torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=2,
        backend=backend,  # type: ignore[arg-type]
        extra_env_vars={"OMP_NUM_THREADS": "1"},
    )


# ---- import paths and 0.4's documented behaviour


@pytest.mark.parametrize("module", sorted(DOCUMENTED_0_4_IMPORTS))
def test_documented_0_4_import_path(module: str) -> None:
    # a fresh interpreter: the path must work as a script's first import, not only after others
    names = ", ".join(DOCUMENTED_0_4_IMPORTS[module])
    subprocess.run([sys.executable, "-c", f"from {module} import {names}"], check=True, timeout=60)


def test_old_paths_are_the_same_objects_not_copies() -> None:
    from torchrunx.integrations import cli, parsing
    from torchrunx.utils import log_handling

    assert parsing is cli
    for name in DOCUMENTED_0_4_IMPORTS["torchrunx.utils.log_handling"]:
        assert getattr(log_handling, name) is getattr(torchrunx.logs, name)


def test_slurm_hostnames_outside_an_allocation_raise_runtime_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0.4's manual: "A RuntimeError will be raised if hostnames="slurm" but no SLURM allocation"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    with pytest.raises(RuntimeError, match="needs a SLURM allocation, but SLURM_JOB_ID is not set"):
        torchrunx.Launcher(hostnames="slurm").run(speak)


def test_default_env_vars_for_copy_are_0_4s() -> None:
    assert torchrunx.DEFAULT_ENV_VARS_FOR_COPY == (
        "PATH", "LD_LIBRARY*", "LIBRARY_PATH", "PYTHON*", "CUDA*", "TORCH*", "PYTORCH*", "NCCL*"
    )  # fmt: skip


# ---- log folders and handlers


def speak() -> None:
    print(f"worker rank: {os.environ['RANK']}")


def test_log_folder_is_named_by_the_run_start_in_iso_8601(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as 0.4's CI test of logging checks it
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(tmp_path))
    before = dt.datetime.now()  # noqa: DTZ005 -- the folder name is naive local time, as in 0.4
    torchrunx.launch(speak, workers_per_host=2, backend="gloo")
    after = dt.datetime.now()  # noqa: DTZ005
    (folder,) = tmp_path.iterdir()
    assert before <= dt.datetime.fromisoformat(folder.name) <= after
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["localhost.log", "localhost[0].log", "localhost[1].log"]
    for rank in (0, 1):
        assert f"worker rank: {rank}\n" in (folder / f"localhost[{rank}].log").read_text()


def test_log_folders_started_together_are_distinct_timestamps(tmp_path: Path) -> None:
    folders = []
    for _ in range(200):  # faster than the clock's microseconds: names collide unless bumped
        (handler,) = torchrunx.logs.file_handlers(["localhost"], [1], tmp_path)
        folders.append(handler.folder)  # type: ignore[attr-defined]
        handler.close()
    names = [f.name for f in folders]
    assert len(set(names)) == len(names)
    stamps = [dt.datetime.fromisoformat(name) for name in names]
    assert stamps == sorted(stamps)


def test_default_handlers_take_0_4s_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchrunx.utils.log_handling import default_handlers

    monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(tmp_path))
    handlers = default_handlers(["localhost"], [2])
    for handler in handlers:
        handler.close()
    (folder,) = tmp_path.iterdir()
    assert len(list(folder.iterdir())) == 3


def test_custom_logging_page_of_the_0_4_manual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torchrunx.utils.log_handling import RedirectHandler, get_handler_filter

    monkeypatch.chdir(tmp_path)
    hostnames = ["localhost"]

    def custom_handlers() -> list[logging.Handler]:
        # the manual's example, with worker 0 redirected too so that something reaches a logger
        redirect_handler = RedirectHandler()
        redirect_handler.addFilter(
            get_handler_filter(hostname=hostnames[0], local_rank=0, log_level=logging.DEBUG)
        )
        file_handler = logging.FileHandler("output.txt")
        file_handler.addFilter(
            get_handler_filter(hostname=hostnames[0], local_rank=1, log_level=logging.DEBUG)
        )
        return [redirect_handler, file_handler]

    caplog.set_level(logging.INFO)
    torchrunx.Launcher(hostnames, workers_per_host=2, backend="gloo").set_logging_handlers(
        custom_handlers
    ).run(speak)
    assert (tmp_path / "output.txt").read_text() == "worker rank: 1\n"
    redirected = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("torchrunx.localhost.0", "worker rank: 0") in redirected
    assert all(message != "worker rank: 1" for _, message in redirected)


# ---- Lightning


def fit_with_lightning(package: str, steps: int, devices: int | None = None) -> dict[str, Any]:
    """DDP on each worker's own data: replicas stay equal only if gradients are synchronised."""
    lightning = importlib.import_module(package)
    from torchrunx.integrations.lightning import TorchrunxClusterEnvironment

    class Regression(lightning.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rank = int(os.environ["RANK"])
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(rank))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8
    )
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    trainer = lightning.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=local_world_size if devices is None else devices,
        num_nodes=int(os.environ["WORLD_SIZE"]) // local_world_size,
        plugins=[TorchrunxClusterEnvironment()],
        max_steps=steps,
        use_distributed_sampler=False,  # each rank keeps its own data
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
    )
    model = Regression()
    trainer.fit(model, data)
    return {
        "steps": trainer.global_step,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "weight": model.layer.weight.detach().clone(),
        "initial": Regression().layer.weight.detach().clone(),
    }


@pytest.mark.parametrize(
    ("package", "backend"),
    [("lightning", "gloo"), ("lightning", None), ("pytorch_lightning", "gloo")],
)
def test_lightning_trainer_fit_with_ddp_replicas_in_step(package: str, backend: str | None) -> None:
    with two_workers(backend) as launcher:
        result = launcher.run(fit_with_lightning, package, steps=5).by_rank()
    assert [r["rank"] for r in result] == [0, 1]
    assert all(r["world_size"] == 2 and r["steps"] == 5 for r in result)
    assert torch.equal(result[0]["weight"], result[1]["weight"])
    assert not torch.equal(result[0]["weight"], result[0]["initial"])  # it trained


def test_lightning_trainer_that_does_not_match_the_run_is_refused() -> None:
    with (
        two_workers() as launcher,
        pytest.raises(ValueError, match=r"devices=int\(os.environ\['LOCAL_WORLD_SIZE'\]\)"),
    ):
        launcher.run(fit_with_lightning, "lightning", steps=1, devices=1)


def test_lightning_environment_outside_a_run_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchrunx.integrations.lightning import TorchrunxClusterEnvironment

    monkeypatch.delenv("RANK", raising=False)
    assert not TorchrunxClusterEnvironment.detect()
    with pytest.raises(RuntimeError, match=r"\$RANK is not set"):
        TorchrunxClusterEnvironment().global_rank()


def test_lightning_integration_without_lightning_says_how_to_install_it() -> None:
    hide = "import sys; sys.modules['lightning'] = sys.modules['lightning_fabric'] = None"
    out = subprocess.run(
        [sys.executable, "-c", f"{hide}; import torchrunx.integrations.lightning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr
    assert "pip install lightning" in out.stderr


# ---- accelerate


def gather_with_accelerate() -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    gathered = accelerator.gather(torch.tensor([float(accelerator.process_index)]))
    return {
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "local_process_index": accelerator.local_process_index,
        "distributed_type": str(accelerator.distributed_type),
        "gathered": gathered.tolist(),
    }


@pytest.mark.parametrize("backend", ["gloo", None])
def test_accelerate_accelerator_in_a_run(backend: str | None) -> None:
    with two_workers(backend) as launcher:
        result = launcher.run(gather_with_accelerate).by_rank()
    for rank, r in enumerate(result):
        assert r["num_processes"] == 2
        assert r["process_index"] == r["local_process_index"] == rank
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["gathered"] == [0.0, 1.0]


# ---- tyro on a function with a nested launcher, as 0.4's examples are written

TYRO_MAIN = """
import torch.distributed as dist
import tyro

import torchrunx


def rank_times(factor: int) -> int:
    return dist.get_rank() * factor


def main(launcher: torchrunx.Launcher, factor: int = 1) -> None:
    print("launcher:", launcher.hostnames, launcher.workers_per_host, launcher.backend)
    print("results:", launcher.run(rank_times, factor).by_rank())


if __name__ == "__main__":
    tyro.cli(main)
"""


def test_tyro_cli_of_a_main_with_a_nested_launcher(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TYRO_MAIN))
    args = [
        "--launcher.hostnames", "localhost",
        "--launcher.workers-per-host", "2",
        "--launcher.backend", "gloo",
        "--factor", "10",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    assert "launcher: ['localhost'] 2 gloo" in out.stdout
    assert "results: [0, 10]" in out.stdout
    shown = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for option in ("--launcher.hostnames", "--launcher.workers-per-host", "--factor"):
        assert option in shown
