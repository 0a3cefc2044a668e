"""Waiting on a run's ranks, for the standalone benchmarks.

Standard library only: their workers import the modules that define their functions, and pay
for what those import.
"""

from __future__ import annotations

import time
from typing import Any


def wait_running(handle: Any, ranks: int, timeout: float) -> None:
    """Until every rank of ``handle``'s run (a ``RunHandle``) is in the function, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = handle.status(timeout=2)
        if len(states) == ranks and all(s.state == "running" for s in states.values()):
            return
        if handle.done():
            handle.result()  # raises what ended it
        time.sleep(0.05)
    msg = f"the ranks were not all running after {timeout:g} s"
    raise TimeoutError(msg)
