"""Lightning's ``Trainer`` in a function that torchrunx runs.

::

    def train() -> None:
        local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        trainer = lightning.Trainer(
            strategy="ddp",
            devices=local_world_size,
            num_nodes=int(os.environ["WORLD_SIZE"]) // local_world_size,
            plugins=[TorchrunxClusterEnvironment()],
        )
        trainer.fit(model, data)

    torchrunx.Launcher(...).run(train)

torchrunx has started the processes; the environment tells Lightning so, and gives it each
worker's ranks and rendezvous from the variables torchrunx set (read here, not through Lightning's
TorchElastic environment, whose behaviour changes between Lightning releases). With a ``backend``,
Lightning finds torchrunx's process group and uses it; with ``backend=None`` it makes its own at
``MASTER_ADDR:MASTER_PORT``.

Works with ``lightning`` (``lightning.Trainer``) and ``pytorch_lightning`` (``pl.Trainer``).
"""

from __future__ import annotations

__all__ = ["TorchrunxClusterEnvironment"]

import importlib
import os
import types
from typing import TYPE_CHECKING

_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR")


def _cluster_environment_bases() -> tuple[type, ...]:
    """Lightning's ``ClusterEnvironment`` of each Lightning package that is installed.

    ``lightning.Trainer`` accepts plugins derived from ``lightning.fabric``'s class,
    ``pytorch_lightning.Trainer`` from ``lightning_fabric``'s (``pip install lightning`` brings
    both packages): deriving from both makes one plugin that either Trainer takes.
    """
    bases = []
    for package in ("lightning.fabric", "lightning_fabric"):
        try:
            module = importlib.import_module(f"{package}.plugins.environments")
        except ImportError:
            continue
        bases.append(module.ClusterEnvironment)
    if not bases:
        msg = (
            "torchrunx.integrations.lightning needs Lightning, which is not installed here: "
            "pip install lightning (or pytorch-lightning)"
        )
        raise ModuleNotFoundError(msg, name="lightning")
    return tuple(bases)


if TYPE_CHECKING:
    from lightning.fabric.plugins.environments.cluster_environment import (
        ClusterEnvironment as _ClusterEnvironment,
    )
else:
    _ClusterEnvironment = types.new_class("_ClusterEnvironment", _cluster_environment_bases())


def _variable(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        msg = (
            f"${name} is not set: TorchrunxClusterEnvironment works in a function that "
            "torchrunx runs (torchrunx.Launcher(...).run(fn)), which sets it"
        )
        raise RuntimeError(msg)
    return value


class TorchrunxClusterEnvironment(_ClusterEnvironment):
    """Lightning's cluster environment for a worker of a torchrunx run.

    Use it as ``Trainer(plugins=[TorchrunxClusterEnvironment()], ...)``, with ``devices`` the
    workers per host (``$LOCAL_WORLD_SIZE``) and ``num_nodes`` the hosts.
    """

    @property
    def creates_processes_externally(self) -> bool:
        """Always: torchrunx has started every worker; Lightning must not start more."""
        return True

    @property
    def main_address(self) -> str:
        """Rank 0's host (``$MASTER_ADDR``)."""
        return _variable("MASTER_ADDR")

    @property
    def main_port(self) -> int:
        """The rendezvous port (``$MASTER_PORT``)."""
        return int(_variable("MASTER_PORT"))

    @staticmethod
    def detect() -> bool:
        """Whether this process is a torchrunx worker (its rank variables are set)."""
        return all(name in os.environ for name in _VARIABLES)

    def world_size(self) -> int:
        """All workers of the run (``$WORLD_SIZE``)."""
        return int(_variable("WORLD_SIZE"))

    def set_world_size(self, size: int) -> None:
        """Ignored: torchrunx has fixed the world size (``validate_settings`` checks it)."""

    def global_rank(self) -> int:
        """This worker's rank (``$RANK``)."""
        return int(_variable("RANK"))

    def set_global_rank(self, rank: int) -> None:
        """Ignored: torchrunx has fixed the rank."""

    def local_rank(self) -> int:
        """This worker's rank on its host (``$LOCAL_RANK``)."""
        return int(_variable("LOCAL_RANK"))

    def node_rank(self) -> int:
        """This worker's host, numbered in the launcher's order (``$GROUP_RANK``)."""
        return int(_variable("GROUP_RANK"))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Refuse a Trainer whose ``devices`` and ``num_nodes`` do not match the run's workers."""
        local_world_size = int(_variable("LOCAL_WORLD_SIZE"))
        world_size = self.world_size()
        if num_devices != local_world_size or num_devices * num_nodes != world_size:
            msg = (
                f"Trainer(devices={num_devices}, num_nodes={num_nodes}) does not match this "
                f"torchrunx run of {world_size} workers, {local_world_size} on this host: pass "
                "devices=int(os.environ['LOCAL_WORLD_SIZE']) and "
                "num_nodes=int(os.environ['WORLD_SIZE']) // int(os.environ['LOCAL_WORLD_SIZE'])"
            )
            raise ValueError(msg)
