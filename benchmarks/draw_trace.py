"""Draw a run's trace (``TORCHRUNX_TRACE``) as a PNG: ``python -m benchmarks.draw_trace IN OUT``.

Needs matplotlib (``pip install matplotlib``). One row per rank (and per agent that started for
the run), one bar per phase, seconds from the run's submission. Perfetto
(https://ui.perfetto.dev) shows the same file interactively.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    """Read the trace, draw it."""
    import matplotlib as mpl  # noqa: PLC0415 -- optional: only this script needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    trace = json.loads(Path(sys.argv[1]).read_text())
    events = trace["traceEvents"]
    hosts = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    spans = [e for e in events if e["ph"] == "X"]
    rows = sorted(
        {(e["pid"], e["tid"]) for e in spans}, key=lambda r: (hosts[r[0]] == "launcher", r)
    )
    names = sorted(
        {e["name"] for e in spans}, key=lambda n: min(e["ts"] for e in spans if e["name"] == n)
    )
    colors = dict(zip(names, plt.get_cmap("tab20").colors, strict=False))
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.4))
    for y, (pid, tid) in enumerate(rows):
        for e in (e for e in spans if (e["pid"], e["tid"]) == (pid, tid)):
            ax.barh(y, e["dur"] / 1e6, left=e["ts"] / 1e6, color=colors[e["name"]], height=0.6)
    labels = [
        f"{hosts[p]} " + ("agent" if t < 0 else "" if hosts[p] == "launcher" else f"rank {t}")
        for p, t in rows
    ]
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run was submitted")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


def _label(host: str, tid: int) -> str:
    if host == "launcher":
        return "launcher"
    return f"{host} agent" if tid < 0 else f"{host} rank {tid}"


if __name__ == "__main__":
    main()
