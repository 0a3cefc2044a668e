"""LaunchResult: the return values of one run, by host and local rank or by global rank."""

from __future__ import annotations

__all__ = ["LaunchResult"]

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator

R = TypeVar("R")


@dataclass
class LaunchResult(Generic[R]):
    """Return values of every worker of a run.

    Global ranks are numbered host by host, in the order of the launcher's hostnames.
    """

    results: dict[str, list[R]]
    """``{hostname: [return value of local rank 0, 1, ...]}``, hosts in launch order."""
    restarts: list[BaseException] = field(default_factory=list)
    """The failures of the attempts before this one, oldest first (``Launcher.max_restarts``);
    empty when the first attempt succeeded."""

    def by_hostname(self) -> dict[str, list[R]]:
        """Return values as ``{hostname: [value of local rank 0, 1, ...]}``."""
        return {host: list(values) for host, values in self.results.items()}

    def by_rank(self) -> list[R]:
        """Return values as a list indexed by global rank."""
        return [value for values in self.results.values() for value in values]

    def rank(self, i: int) -> R:
        """Return value of global rank ``i``; a negative ``i`` counts back from the last rank."""
        values = self.by_rank()
        if not -len(values) <= i < len(values):
            msg = f"rank {i} is out of range: this run had {len(values)} workers"
            raise IndexError(msg)
        return values[i]

    def index(self, hostname: str, local_rank: int) -> R:
        """Return value of the worker with ``local_rank`` on ``hostname``."""
        if hostname not in self.results:
            msg = f"no worker ran on {hostname!r}; hosts of this run: {list(self.results)}"
            raise KeyError(msg)
        values = self.results[hostname]
        if not 0 <= local_rank < len(values):
            msg = f"local rank {local_rank} is out of range: {hostname!r} ran {len(values)} workers"
            raise IndexError(msg)
        return values[local_rank]

    def __len__(self) -> int:
        return sum(len(values) for values in self.results.values())

    def __iter__(self) -> Iterator[R]:
        return iter(self.by_rank())
