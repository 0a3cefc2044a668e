"""Which of a launcher's hosts get ranks: those in use, the warm spares, the lost.

::

    hostnames = [node1, node2, node3, node4],  spares=1
    in use: [node1, node2, node3]   spares: [node4]   lost: {}
        node2 lost (its agent died, went silent, its connection dropped) during a run
    in use: [node1, node4, node3]   spares: []        lost: {node2}   (node4 has node2's ranks)
        node2's agent answers again (tried in the background at each later run)
    in use: [node1, node4, node3]   spares: [node2]   lost: {}

A spare is an agent without ranks: it starts with the others and stays warm. Ranks are given to
hosts at each attempt, by position: a spare that takes a lost host's place takes its ranks (and
its entry of ``workers_per_host``). Touched under the pool's lock.
"""

from __future__ import annotations

__all__ = ["Roster"]


class Roster:
    """The hosts in use (in rank order), the spares, and the hosts lost until they answer."""

    def __init__(self, hostnames: list[str], spares: int) -> None:
        active = len(hostnames) - spares
        self.in_use = list(hostnames[:active])
        self.spares = list(hostnames[active:])
        self.lost: set[str] = set()

    def replace(self, host: str) -> str | None:
        """``host`` is lost: the spare that takes its place, or None if none is left."""
        self.lost.add(host)
        if host in self.spares:
            self.spares.remove(host)
        if not self.spares:
            return None
        spare = self.spares.pop(0)
        self.in_use = [spare if h == host else h for h in self.in_use]
        return spare

    def retry(self, host: str) -> None:
        """No spare was left: ``host`` is to be tried once more, in its own place."""
        self.lost.discard(host)

    def found(self, host: str) -> None:
        """A lost host answers again: it is a spare now (or in use again, if it still was)."""
        self.lost.discard(host)
        if host not in self.in_use and host not in self.spares:
            self.spares.append(host)
