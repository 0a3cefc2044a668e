"""What the benchmark driver and its scenario processes agree on: names, and the result file.

Standard library only: the driver (``compare.py``) runs without torch. The driver imports this
module as ``benchmarks.protocol``; ``scenario.py`` and ``workloads.py`` import it as ``protocol``:
scenario processes and workers have this folder on ``sys.path``, and not the repository root,
whose ``torchrunx`` would shadow torchrunx 0.4.0 under test.

A scenario process writes one JSON object to the file given by its ``--out``: ``{"metrics":
[...], "details": {...}}``, or ``{"error": "..."}`` where it failed. Each metric is flat, a record
made by :func:`metric`: its name, its unit, which way is better, and the values (and notes) that
this process measured for the one implementation it runs. The driver collects each metric's
values per implementation and prints every metric in one table, knowing none of them by name.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

#: Stamp file (in the scenario's stamp folder) that holds the time of an injected failure: the
#: workers write it, the scenario process measures from it, the driver caps the process after it.
EVENT_STAMP = "event"

#: Hosts of the ``multihost_first_run_<N>`` scenarios.
MULTIHOST_FIRST_RUN_HOSTS = (1, 4, 8)

LOWER = "lower"
HIGHER = "higher"
BETTER = (LOWER, HIGHER)

Record = dict[str, Any]


def multihost_first_run_name(hosts: int) -> str:
    """Name of the scenario (and metric) of a first run on ``hosts`` hosts."""
    return f"multihost_first_run_{hosts}"


def metric(
    name: str, unit: str, better: str, values: Sequence[float], notes: Sequence[str] = ()
) -> Record:
    """One metric of one implementation: ``values`` measured in ``unit``, ``better`` lower/higher.

    ``notes`` are what a number cannot say (an exception type, a missing view); the table shows
    the distinct ones next to the values.
    """
    if better not in BETTER:
        msg = f"metric {name!r}: better must be one of {BETTER}, not {better!r}"
        raise ValueError(msg)
    numbers = [float(v) for v in values]
    if not all(math.isfinite(v) for v in numbers):
        msg = f"metric {name!r}: values must be finite numbers, not {values!r}"
        raise ValueError(msg)
    return {"name": name, "unit": unit, "better": better, "values": numbers, "notes": list(notes)}


def measured(metrics: list[Record], **details: Any) -> Record:
    """What a scenario process measured: its metrics, and details kept for the results file."""
    return {"metrics": metrics, "details": details}


def failed(message: str) -> Record:
    """What a scenario process that failed reports instead of metrics."""
    return {"error": message}


def write_result(path: Path, data: Record) -> None:
    """Write a result file atomically: the driver never reads half of one."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def read_result(path: Path) -> Record:
    """A result file, or ``{}`` where the process wrote none."""
    if not path.exists():
        return {}
    data: Record = json.loads(path.read_text())
    return data
