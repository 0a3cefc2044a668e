"""A debugger on any rank: ``breakpoint()`` in a worker opens pdb in the launcher's terminal.

Every test drives a real terminal: the launcher runs under a pseudo-terminal (pexpect), and the
test waits for the prompt, types commands and reads what they print, as a person would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect
import psutil
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from testbed.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, pdb
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torchrunx


def helper(rank):
    divisor = rank - 1
    return 10 / divisor


def train(scale, stops, out):
    rank = dist.get_rank()
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    value = rank * scale
    if rank in stops:
        Path(out, f"stamp{rank}").write_text(repr(time.time()))
        pdb.set_trace() if MODE == "set_trace" else breakpoint()
    if MODE == "post_mortem":
        helper(rank)
    dist.barrier()
    return value


MODE, STOPS, OUT = sys.argv[1], [int(r) for r in sys.argv[2].split(",") if r], sys.argv[3]
HOSTS, WORKERS = sys.argv[4].split(","), int(sys.argv[5])
launcher = torchrunx.Launcher(
    hostnames=HOSTS,
    workers_per_host=WORKERS,
    backend="gloo",
    log_dir="",
    ssh_config_file=os.environ.get("SSH_CONFIG") or None,
    debug_ranks=[int(r) for r in os.environ["DEBUG_RANKS"].split(",")]
    if os.environ.get("DEBUG_RANKS") else "all",
    post_mortem=MODE == "post_mortem",
)
try:
    print("results:", launcher.run(train, 10, STOPS, OUT).by_rank(), flush=True)
except Exception as e:
    print(f"raised {type(e).__name__}: {e}", flush=True)
finally:
    launcher.close()
"""


def prompt(rank: int, host: str = "localhost") -> str:
    return f"(Pdb rank {rank} @ {host}) "


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def spawn(
    script: Path,
    mode: str,
    stops: str,
    *,
    hosts: str = "localhost",
    workers: int = 2,
    env: dict[str, str] | None = None,
    piped: bool = False,
) -> pexpect.spawn:
    """The script in a terminal; ``piped``: its stdout through ``| cat`` (stdin the terminal)."""
    args = [sys.executable, str(script), mode, stops, str(script.parent), hosts, str(workers)]
    if piped:
        args = ["bash", "-c", " ".join(args) + " | cat"]
    child = pexpect.spawn(
        args[0],
        args[1:],
        cwd=str(script.parent),
        timeout=60,
        encoding="utf-8",
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    child.logfile_read = sys.stdout  # shown when a test fails
    return child


@pytest.fixture
def children() -> Iterator[list[pexpect.spawn]]:
    made: list[pexpect.spawn] = []
    yield made
    for child in made:
        child.close(force=True)


def command(child: pexpect.spawn, line: str, rank: int = 1, host: str = "localhost") -> str:
    """Type ``line`` at the prompt; what it printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(prompt(rank, host))
    return str(child.before)


def workers_gone(out: Path, ranks: int) -> None:
    pids = [int((out / f"pid{r}").read_text()) for r in range(ranks)]
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if psutil.pid_exists(p)]


def test_breakpoint_opens_pdb_in_the_launchers_terminal(
    script: Path, children: list[pexpect.spawn]
) -> None:
    child = spawn(script, "plain", "1")
    children.append(child)
    child.expect(r"\*\*\* torchrunx: rank 1 @ localhost stopped: breakpoint\(\) at \S*train.py:22")
    child.expect_exact(prompt(1))
    seen = time.time()
    stamp = float((script.parent / "stamp1").read_text())
    assert seen - stamp < 5  # 1 s is the aim; a loaded test machine gets slack
    assert "-> dist.barrier()" in str(child.before) or "-> if MODE" in str(child.before)
    assert command(child, "p value").strip().endswith("10")
    listing = command(child, "l")
    assert "breakpoint()" in listing
    assert "value = rank * scale" in listing
    where = command(child, "w")
    assert "train()" in where
    assert "forkserver" not in where  # the worker's own frames are not the user's to debug
    command(child, "n")
    assert command(child, "p rank * 7").strip().endswith("7")
    command(child, "!value = 99")  # runs in the worker: its return value changes
    child.sendline("c")
    child.expect_exact("results: [0, 99]")
    child.expect(pexpect.EOF)


def test_pdb_set_trace_too(script: Path, children: list[pexpect.spawn]) -> None:
    child = spawn(script, "set_trace", "0")
    children.append(child)
    child.expect(r"rank 0 @ localhost stopped: breakpoint\(\) at \S*train.py:22")
    child.expect_exact(prompt(0))
    assert command(child, "p rank", 0).strip().endswith("0")
    child.sendline("c")
    child.expect_exact("results: [0, 10]")
    child.expect(pexpect.EOF)


def test_step_into_a_function_the_user_wrote(script: Path, children: list[pexpect.spawn]) -> None:
    child = spawn(script, "post_mortem", "1", env={"DEBUG_RANKS": "1"})
    children.append(child)
    child.expect_exact(prompt(1))
    for _ in range(5):  # to the call of helper
        if "-> helper(rank)" in command(child, "n"):
            break
    assert "-> divisor = rank - 1" in command(child, "s") + command(child, "n")
    child.sendline("c")  # on to the ZeroDivisionError: post-mortem, at the raising frame
    child.expect(r"stopped: post-mortem: ZeroDivisionError at \S*train.py:13")
    child.expect_exact(prompt(1))
    assert "-> return 10 / divisor" in str(child.before)
    assert command(child, "p divisor").strip().endswith("0")
    child.sendline("c")
    child.expect_exact("raised ZeroDivisionError: division by zero")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize(
    ("keys", "how"),
    [("q", "'q' at the prompt"), ("\x04", "end of input at the prompt"), ("\x03", "Ctrl-C")],
)
def test_quit_ends_the_run_cleanly_with_an_error_that_says_so(
    script: Path, children: list[pexpect.spawn], keys: str, how: str
) -> None:
    child = spawn(script, "plain", "1")
    children.append(child)
    child.expect_exact(prompt(1))
    if keys == "q":
        child.sendline(keys)
    else:
        child.send(keys)
    child.expect_exact(
        f"raised DebuggerQuitError: the run was quit from the debugger of rank 1 "
        f"(local rank 1) on localhost: {how}"
    )
    child.expect(pexpect.EOF)
    workers_gone(script.parent, 2)


def test_ranks_that_stop_together_queue_up(script: Path, children: list[pexpect.spawn]) -> None:
    child = spawn(script, "plain", "0,1,2", workers=3)
    children.append(child)
    seen = []
    for _ in range(3):
        child.expect(r"\*\*\* torchrunx: rank (\d) @ localhost stopped: breakpoint\(\)[^*]*\*\*\*")
        rank = int(child.match.group(1))
        seen.append(rank)
        child.expect_exact(prompt(rank))
        assert command(child, "p rank", rank).strip().endswith(str(rank))
        child.sendline("c")
    assert sorted(seen) == [0, 1, 2]
    child.expect_exact("results: [0, 10, 20]")
    child.expect(pexpect.EOF)


def test_debug_ranks_chooses_who_may_stop(script: Path, children: list[pexpect.spawn]) -> None:
    child = spawn(script, "plain", "0,1,2", workers=3, env={"DEBUG_RANKS": "2"})
    children.append(child)
    child.expect_exact(prompt(2))
    assert "rank 0 @" not in str(child.before)
    assert "rank 1 @" not in str(child.before)
    child.sendline("c")
    child.expect_exact("results: [0, 10, 20]")
    assert "(Pdb rank" not in str(child.before)
    child.expect(pexpect.EOF)


def without_a_terminal(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The script, its stdin not a terminal (as in CI or a batch job)."""
    args = [sys.executable, str(script), "plain", "1", str(script.parent), "localhost", "2"]
    return subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        check=True,
    )


def test_without_a_terminal_a_breakpoint_is_skipped_with_one_warning(script: Path) -> None:
    out = without_a_terminal(script)
    assert "results: [0, 10]" in out.stdout
    warnings = re.findall(
        r"torchrunx: breakpoint\(\) at (\S+) skipped on rank (\d)(.*)", out.stderr
    )
    assert [(w[0].rsplit("/", 1)[-1], w[1]) for w in warnings] == [("train.py:22", "1")]
    assert "the launcher's stdin is not a terminal" in warnings[0][2]
    silent = without_a_terminal(script, PYTHONBREAKPOINT="0")
    assert "results: [0, 10]" in silent.stdout
    assert "skipped" not in silent.stderr


def test_debug_ranks_is_checked(script: Path) -> None:
    import torchrunx

    with pytest.raises(ValueError, match=r"debug_ranks=\[-1\]: use a rank"):
        torchrunx.Launcher(debug_ranks=[-1])
    with pytest.raises(TypeError, match=r"post_mortem='yes': use True or False"):
        torchrunx.Launcher(post_mortem="yes")  # type: ignore[arg-type]
    with (
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, debug_ranks=5) as lau,
        pytest.raises(ValueError, match=r"debug_ranks names ranks \[5\], but this run has ranks"),
    ):
        lau.run(os.getpid)
    del script


# ---- on the test hosts


def test_a_rank_on_another_host(
    script: Path, children: list[pexpect.spawn], cluster: Cluster
) -> None:
    hosts = ",".join(cluster.hostnames[:2])
    env = {"SSH_CONFIG": str(cluster.ssh_config)}
    child = spawn(script, "plain", "1", hosts=hosts, workers=1, env=env)
    children.append(child)
    host = cluster.hostnames[1]
    child.expect_exact(prompt(1, host))
    assert command(child, "p value", 1, host).strip().endswith("10")
    assert (
        command(child, "import socket; print(socket.gethostname())", 1, host).strip().endswith(host)
    )
    child.sendline("q")
    child.expect_exact("raised DebuggerQuitError: the run was quit from the debugger of rank 1")
    child.expect(pexpect.EOF)


def test_the_prompt_has_history_and_completion_as_pdb_has(
    script: Path, children: list[pexpect.spawn]
) -> None:
    child = spawn(script, "plain", "1")
    children.append(child)
    child.expect_exact(prompt(1))
    assert command(child, "p value * 3").strip().endswith("30")
    child.send("\x1b[A")  # Up: the line before, to run again
    assert command(child, "").strip().endswith("30")
    child.send("p val\t")  # Tab: a name of the rank's frame, completed by the rank
    child.expect_exact("ue")
    assert command(child, " + 1").strip().endswith("11")
    child.send("whe\t")  # a pdb command's name
    child.expect_exact("re")
    assert "train()" in command(child, "")
    child.send("p helper.__na\t")  # an attribute
    child.expect_exact("me__")
    assert command(child, "").strip().endswith("'helper'")
    child.sendline("c")
    child.expect_exact("results: [0, 10]")
    child.expect(pexpect.EOF)


def test_output_piped_and_stdin_a_terminal_still_stops(
    script: Path, children: list[pexpect.spawn]
) -> None:
    """As plain pdb under ``| tee``: the prompt and the session go to the pipe."""
    child = spawn(script, "plain", "1", piped=True)
    children.append(child)
    child.expect_exact(prompt(1))
    child.sendline("p value + 2")
    child.expect_exact("12")
    child.expect_exact(prompt(1))
    assert "\x1b" not in str(child.before)  # no line editor on a pipe: nothing but text
    child.sendline("c")
    child.expect_exact("results: [0, 10]")
    child.expect(pexpect.EOF)
