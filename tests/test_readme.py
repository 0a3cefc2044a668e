"""Every ```python block of README.md and of the documentation (docs/) runs.

Each block runs in a subprocess of its own, after a prelude that defines stand-ins for the names
the pages leave to the reader (``train``, ``evaluate``, ``serve_model``, ``evaluate_against``
and a ``launcher``), and its tracebacks name its page (README.md, docs/...) and line numbers. A
comment ``<!-- test: ... -->`` on the line before a block says how to run it:

* ``<!-- test: hosts -->``: the block runs on the test hosts (node1, node2, ... of
  testbed/cluster.py), with the cluster's ssh config as ``~/.ssh/config`` (a HOME of its own),
  so it runs as written.
* ``<!-- test: skip, <reason> -->``: the block is not run, for the reason given.

Every ``print(...)  # expected`` line must print ``expected``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testbed.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
TIMEOUT_S = 120
MARKER = re.compile(r"<!--\s*test:\s*(?P<kind>hosts|skip)\s*(?:,\s*(?P<reason>.*?))?\s*-->")
EXPECTED_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s+(?P<expected>.+)$")
USES_TEST_HOSTS = re.compile(r"hostnames=\[[^\]]*[\"']node\d")

PRELUDE = '''
import os
import time

import torch
import torch.distributed as dist

import torchrunx


def train(*args, steps=20, lr=0.05, **kwargs):
    """Stand-in for your training function: a linear model, gradients summed over the workers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    x = torch.randn(64, 8, generator=g)
    y = x.sum(dim=1, keepdim=True)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for parameter, grad in zip(model.parameters(), grads):
                if dist.is_initialized():
                    dist.all_reduce(grad)
                parameter -= lr * grad / int(os.environ["WORLD_SIZE"])
    return model.state_dict()


def evaluate(weights=None, *args, **kwargs):
    """Stand-in: a number computed from the weights."""
    return float(sum(t.abs().sum() for t in (weights or {}).values()))


def serve_model(port):
    """Stand-in for a server that runs until it is cancelled."""
    time.sleep(600)


def evaluate_against(address):
    """Stand-in for an evaluation that uses a server."""
    return 1.0


launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo")
'''

POSTLUDE = """
print("README-TEST-RESULTS", __import__("json").dumps({
    name: list(value.by_hostname())
    for name, value in list(globals().items())
    if isinstance(value, torchrunx.LaunchResult)
}))
"""


@dataclass
class Block:
    page: str  # README.md, docs/...
    line: int  # of the block's first code line in its page
    code: str
    kind: str | None  # "hosts", "skip" or None (runs here)
    reason: str | None
    section: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        page = "" if self.page == "README.md" else self.page.removeprefix("docs/")[:-3] + "-"
        return f"{page}L{self.line}-{slug}"

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line} ({self.section})"


def python_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    page = path.relative_to(REPO).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    section, previous, i = "top", "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(("# ", "## ")):
            section = line.split(" ", 1)[1]
        if line.strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            marker = MARKER.fullmatch(previous.strip())
            blocks.append(
                Block(
                    page=page,
                    line=start + 1,
                    code="\n".join(lines[start:end]) + "\n",
                    kind=marker["kind"] if marker else None,
                    reason=marker["reason"] if marker else None,
                    section=section,
                )
            )
            i = end
        elif line.strip():
            previous = line
        i += 1
    return blocks


BLOCKS = [block for path in PAGES for block in python_blocks(path)]


def script_for(block: Block) -> str:
    """Prelude, the block compiled as its page at its own line numbers, then a summary line."""
    padded = "\n" * (block.line - 1) + block.code
    run = f"exec(compile({padded!r}, {block.page!r}, 'exec'), globals())\n"
    return textwrap.dedent(PRELUDE) + run + POSTLUDE


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = cwd / "block.py"
    script.write_text(script_for(block), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    where = block.where
    assert out.returncode == 0, f"{where} failed:\n{out.stdout}\n{out.stderr}"
    for line in block.code.splitlines():
        m = EXPECTED_PRINT.match(line)
        if m:
            assert m["expected"] in out.stdout, (
                f"{where}: expected {m['expected']!r} in {out.stdout}"
            )
    return out


def launch_results(out: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """``{variable: hostnames}`` of the LaunchResults the block left in its globals."""
    line = next(x for x in out.stdout.splitlines() if x.startswith("README-TEST-RESULTS "))
    return json.loads(line.split(" ", 1)[1])


def environ() -> dict[str, str]:
    """This environment without SLURM's variables (hostnames "auto" must mean this machine)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def test_the_pages_have_blocks_and_every_marker_is_understood() -> None:
    assert len(BLOCKS) >= 8
    assert any(b.page == "README.md" for b in BLOCKS)
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        markers = re.findall(r"^<!--\s*test:", text, flags=re.MULTILINE)
        page = path.relative_to(REPO).as_posix()
        assert len(markers) == sum(b.kind is not None for b in BLOCKS if b.page == page), page
    for block in BLOCKS:
        if block.kind == "skip":
            assert block.reason, f"{block.where}: say why the block is skipped"
        if USES_TEST_HOSTS.search(block.code):
            assert block.kind == "hosts", f"{block.where} needs <!-- test: hosts -->"


LOCAL_BLOCKS = [
    pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.reason)] if b.kind == "skip" else [])
    for b in BLOCKS
    if b.kind != "hosts"
]


@pytest.mark.parametrize("block", LOCAL_BLOCKS)
def test_block_runs_here(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path, environ())


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "hosts"], ids=lambda b: b.id)
def test_block_runs_on_the_test_hosts(block: Block, cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(cluster.ssh_config.read_text())
    out = run_block(block, tmp_path, {**environ(), "HOME": str(home)})
    results = launch_results(out)
    assert results, f"{block.where} left no LaunchResult to check"
    for name, hosts in results.items():
        assert hosts, name
        assert set(hosts) <= set(cluster.hostnames[:2]), (name, hosts)
