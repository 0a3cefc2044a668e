"""A failed or hung run explains itself: every live rank's stack, tracebacks into the user's
file, partial results, the log files; on one host, on the test hosts, and under Ctrl-C."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect
import pytest
import torch
import torch.distributed as dist

import torchrunx
from torchrunx.outcome import SILENT
from torchrunx.stacks import STARTING

if TYPE_CHECKING:
    from testbed.cluster import Cluster

HERE = Path(__file__).name


def stuck_in_user_code(seconds: float = 60) -> None:
    time.sleep(seconds)


def one_rank_stuck(stuck: int = 1) -> None:
    if dist.get_rank() == stuck:
        stuck_in_user_code()
    dist.barrier()


def test_a_hung_rank_is_named_in_the_timeout_error() -> None:
    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", worker_timeout=3
    )
    start = time.monotonic()
    with launcher, pytest.raises(RuntimeError, match=r"[Tt]imed out") as info:
        launcher.run(one_rank_stuck)
    elapsed = time.monotonic() - start
    notes = "\n".join(info.value.__notes__)
    assert re.search(rf"rank 1: stuck_in_user_code \(\S*{HERE}:\d+\) <- one_rank_stuck", notes)
    stacks = info.value.stacks  # type: ignore[attr-defined]
    assert set(stacks) == {1}
    assert "stuck_in_user_code" in stacks[1]
    assert set(info.value.failures) == {0}  # type: ignore[attr-defined]
    assert elapsed < 3 + 2 + 10  # the timeout, the autopsy's bound, a slow first start


def raise_on(rank: int, value: int = 7) -> int:
    if dist.get_rank() == rank:
        time.sleep(0.5)  # the others are in the barrier by now
        msg = "bad config 42"
        raise ValueError(msg)
    if dist.get_rank() == 0:
        return value  # returns at once: a partial result
    dist.barrier()
    return value


def test_autopsy_when_a_rank_raises_with_partial_results() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=3, backend="gloo") as lau:
        lau.run(os.getpid)  # warm: what follows is timed
        handle = lau.submit(raise_on, 1)
        with pytest.raises(ValueError, match="bad config 42") as info:
            handle.result(timeout=60)
    e = info.value
    notes = "\n".join(e.__notes__)
    assert re.search(rf"rank 2: barrier \(torch/distributed/\S+\) <- raise_on \(\S*{HERE}:", notes)
    assert set(e.stacks) == {2}  # type: ignore[attr-defined]
    assert e.partial_results == {0: 7}  # type: ignore[attr-defined]
    assert list(e.failures) == [1]  # type: ignore[attr-defined]
    assert e.failures[1] is e  # type: ignore[attr-defined]
    assert handle.partial_results() == {0: 7}
    assert list(handle.failures()) == [1]
    assert handle.stacks() == e.stacks  # type: ignore[attr-defined]


def die_on(rank: int) -> None:
    if dist.get_rank() == rank:
        print("about to die", flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    stuck_in_user_code()  # not in a collective: no error of its own when the peer dies


def test_autopsy_when_a_rank_dies_names_its_log_files(tmp_path: Path) -> None:
    launcher = torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir=tmp_path
    )
    with launcher, pytest.raises(torchrunx.WorkerFailedError) as info:
        launcher.run(die_on, 1)
    text = str(info.value)
    (folder,) = tmp_path.iterdir()
    worker_log, agent_log = folder / "localhost[1].log", folder / "localhost.log"
    assert f"Its log: {worker_log} (agent: {agent_log})" in text
    assert "about to die" in worker_log.read_text()
    notes = "\n".join(info.value.__notes__)
    assert re.search(rf"rank 0: stuck_in_user_code \(\S*{HERE}:\d+\) <- die_on", notes)
    assert "did not answer" not in notes  # the dead rank is not asked


def crash_in_user_code() -> None:
    import ctypes

    ctypes.string_at(0)  # a segfault, as a broken extension would


def crash_on(rank: int) -> None:
    if dist.get_rank() == rank:
        time.sleep(0.5)
        crash_in_user_code()
    stuck_in_user_code()


def test_a_rank_that_dies_of_a_fatal_signal_says_where() -> None:
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo")
    with launcher, pytest.raises(torchrunx.WorkerFailedError, match="SIGSEGV") as info:
        launcher.run(crash_on, 1)
    notes = "\n".join(info.value.__notes__)
    dying = rf"rank 1: string_at \(ctypes/\S+\) <- crash_in_user_code \(\S*{HERE}:\d+\) \(as"
    assert re.search(dying + r" it died\)", notes)
    assert re.search(rf"rank 0: stuck_in_user_code \(\S*{HERE}:\d+\) <- crash_on", notes)
    assert "in crash_in_user_code" in info.value.stacks[1]  # type: ignore[attr-defined]


def wait_for_file(path: str) -> int:
    if dist.get_rank() == 1:
        while not Path(path).exists():
            stuck_in_user_code(0.05)
    dist.barrier()
    return dist.get_rank()


def stacks_when_ready(handle: torchrunx.RunHandle[int], ranks: int) -> dict[int, str]:
    """The stacks once every rank is in the function, rank 1 in its sleep (it polls a file)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stacks = handle.stacks(timeout=5)
        if (
            len(stacks) == ranks
            and STARTING not in stacks.values()
            and "in stuck_in_user_code" in stacks.get(1, "in stuck_in_user_code")
        ):
            return stacks
        time.sleep(0.1)
    pytest.fail(f"ranks never all in the function: {handle.stacks()}")


def test_stacks_on_demand_do_not_stop_the_run(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=3, backend="gloo") as lau:
        handle = lau.submit(wait_for_file, str(go))
        stacks = stacks_when_ready(handle, 3)
        assert "in stuck_in_user_code" in stacks[1]
        for rank in (0, 2):  # blocked in C inside the collective: their Python frames show
            assert "in barrier" in stacks[rank]
            assert "in wait_for_file" in stacks[rank]
        assert not handle.done()
        go.touch()
        assert handle.result(timeout=60).by_rank() == [0, 1, 2]
        assert handle.stacks() == {}  # it succeeded: nothing to explain


def one_collective_behind(behind: int) -> None:
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == behind:
        stuck_in_user_code()
    dist.all_reduce(t)


def test_each_rank_says_which_collective_it_entered_last() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=3, backend="gloo") as lau:
        handle = lau.submit(one_collective_behind, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until rank 1 is stuck, the others in all_reduce #2
            stacks = handle.stacks(timeout=5)
            if all("#2 gloo:all_reduce" in stacks.get(r, "") for r in (0, 2)):
                break
        assert "torchrunx: last collective #1 gloo:all_reduce, completed" in stacks[1]
        assert "torchrunx: last collective #2 gloo:all_reduce, not completed" in stacks[0]
        assert handle.cancel()
        report = handle.autopsy()
    assert re.search(
        r"rank 1: stuck_in_user_code \(.*\) · last collective #1 gloo:all_reduce, completed\n"
        r"ranks 0, 2: all_reduce \(.*\) · last collective #2 gloo:all_reduce, not completed",
        report,
    ), report


def stop_on(rank: int) -> None:
    if dist.get_rank() == rank:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.barrier()


def test_a_rank_that_cannot_answer_is_named_and_torn_down() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        handle = lau.submit(stop_on, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until rank 0 is in the barrier, rank 1 stopped
            stacks = handle.stacks(timeout=5)
            if "in barrier" in stacks.get(0, "") and stacks.get(1) == SILENT:
                break
        else:
            pytest.fail(f"not as expected: {handle.stacks()}")
        start = time.monotonic()
        assert handle.cancel()
        elapsed = time.monotonic() - start
        report = handle.autopsy()
        assert "rank 1: did not answer within 1 s (stopped, or stuck in the kernel)" in report
        assert "rank 0: barrier (" in report
        assert elapsed < 10
        assert lau.run(lambda: 1).by_rank() == [1, 1]  # the stopped rank is gone


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def raise_while_the_others_hold_the_gil() -> None:
    """Rank 2 raises; the others block in C with the GIL held (they never read the agent's
    question), as a rank in a long kernel or a C extension's loop does."""
    if os.environ["RANK"] != "2":
        libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL
        mutex = ctypes.create_string_buffer(64)  # zeroed: an unlocked glibc mutex
        libc.pthread_mutex_lock(mutex)
        until = time.time() + 30
        libc.pthread_mutex_timedlock(mutex, ctypes.byref(_Timespec(int(until), 0)))
    time.sleep(0.5)
    raise ValueError("rank 2 fails while the others hold the GIL")


def test_ranks_holding_the_gil_do_not_take_their_agents_down(cluster: Cluster) -> None:
    """Killed with our question unread, a worker's channel reads as reset: the agents live on."""
    hosts = cluster.hostnames[:2]
    config = cluster.ssh_config
    with torchrunx.Launcher(hostnames=hosts, workers_per_host=2, ssh_config_file=config) as lau:
        with pytest.raises(ValueError, match="hold the GIL") as info:
            lau.run(raise_while_the_others_hold_the_gil)
        assert "ranks 0-1, 3: raise_while_the_others_hold_the_gil (" in info.value.__notes__[-1]
        assert len(lau.run(os.getpid).by_rank()) == 4  # the same agents, still up


CTRL_C_SCRIPT = """
import time
import torch.distributed as dist
import torchrunx


def stuck_in_user_code():
    print("stuck now", flush=True)
    time.sleep(60)


def train():
    if dist.get_rank() == 1:
        stuck_in_user_code()
    dist.barrier()


torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo", live_ranks="all",
                   log_dir="").run(train)
"""


def test_ctrl_c_prints_where_the_ranks_were_before_keyboard_interrupt(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(CTRL_C_SCRIPT)
    child = pexpect.spawn(
        sys.executable, [str(script)], cwd=str(tmp_path), timeout=60, encoding="utf-8"
    )
    try:
        child.expect_exact("stuck now")
        time.sleep(1)  # rank 0 reaches the barrier
        child.sendintr()  # Ctrl-C, through the terminal
        child.expect_exact("torchrunx: run cancelled; its ranks were at:")
        child.expect(r"rank 0: barrier \(torch/distributed/\S+:\d+\) <- train")
        child.expect(r"rank 1: stuck_in_user_code \(train.py:\d+\) <- train \(train.py:\d+\)")
        child.expect_exact("KeyboardInterrupt")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus != 0 or child.signalstatus == signal.SIGINT


# ---- tracebacks into the user's own code

SCRIPT = """
import torchrunx


def helper(x):
    return 1 / x


def train():
    return helper(0)


if __name__ == "__main__":
    try:
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None,
                           log_dir="").run(train)
    except ZeroDivisionError as e:
        print(e.__cause__)
"""


def test_a_traceback_names_the_users_file_line_and_source(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    assert f'File "{script}", line 10, in train' in out.stdout
    assert "    return helper(0)" in out.stdout
    assert f'File "{script}", line 6, in helper' in out.stdout
    assert "    return 1 / x" in out.stdout
    assert "<dynamic-code>" not in out.stdout
    assert "torchrunx/worker.py" not in out.stdout  # the traceback starts in the user's code


NOTEBOOK = [
    (
        "import torchrunx\nlauncher = torchrunx.Launcher(hostnames=['localhost'], "
        "workers_per_host=1, backend=None, log_dir='')"
    ),
    "def cell_helper(x):\n    return {}[x]  # the failing line of a notebook cell",
    (
        "try:\n    launcher.run(cell_helper, 'k')\nexcept KeyError as e:\n    print(e.__cause__)\n"
        "launcher.close()"
    ),
]


def test_a_traceback_shows_the_source_of_a_notebook_cell() -> None:
    pytest.importorskip("IPython")
    program = textwrap.dedent(f"""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        for cell in {NOTEBOOK!r}:
            shell.run_cell(cell).raise_error()
    """)
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True
    )
    assert "in cell_helper" in out.stdout, out.stdout + out.stderr
    assert "return {}[x]  # the failing line of a notebook cell" in out.stdout
    assert "<dynamic-code>" not in out.stdout


# ---- culprit and collateral


def test_the_culprit_is_raised_and_the_collateral_listed_one_line_each() -> None:
    from torchrunx.outcome import Evidence, WorkerDied, WorkerRaised, failure_exception
    from torchrunx.transport.messages import Died, Raised, decode, encode

    def arrived(message: Raised | Died) -> Raised | Died:
        decoded, _ = decode(encode(message))
        assert isinstance(decoded, (Raised, Died))
        return decoded

    reset = "Connection reset by peer"
    collateral = [
        arrived(Raised("r", rank, rank, "builtins.RuntimeError", reset, "tb", unpicklable="x"))
        for rank in (0, 2)
    ]
    death = arrived(Died("r", 1, 1, 99, ("last words",), signal="SIGKILL"))
    failures = [
        WorkerRaised("h", collateral[0], []),  # type: ignore[arg-type]
        WorkerDied("h", death),  # type: ignore[arg-type]
        WorkerRaised("h", collateral[1], []),  # type: ignore[arg-type]
    ]
    exc = failure_exception(failures, {}, ["h"], [3], Evidence())
    assert isinstance(exc, torchrunx.WorkerFailedError)
    assert exc.rank == 1
    (note,) = exc.__notes__
    assert note.splitlines() == [
        "collateral, after it in this run:",
        f"  rank 0 (local rank 0) on h raised builtins.RuntimeError: {reset}",
        f"  rank 2 (local rank 2) on h raised builtins.RuntimeError: {reset}",
    ]
    assert sorted(exc.failures) == [0, 1, 2]  # type: ignore[attr-defined]


# ---- on the test hosts


def test_a_hung_rank_on_another_host(cluster: Cluster) -> None:
    hosts = cluster.hostnames[:2]
    launcher = torchrunx.Launcher(
        hostnames=hosts,
        workers_per_host=1,
        backend="gloo",
        worker_timeout=3,
        ssh_config_file=cluster.ssh_config,
    )
    with launcher:
        launcher.run(os.getpid)  # agents up: what follows is the failure alone
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"[Tt]imed out") as info:
            launcher.run(one_rank_stuck)
        elapsed = time.monotonic() - start
        stacks = launcher.submit(wait_for_file, "/nonexistent/never")
        on_demand = stacks_when_ready(stacks, 2)
        stacks.cancel()
    notes = "\n".join(info.value.__notes__)
    assert re.search(rf"rank 1: stuck_in_user_code \(\S*{HERE}:\d+\)", notes)
    assert elapsed < 3 + 2 + 3
    assert "in stuck_in_user_code" in on_demand[1]  # rank 1 is on the second host
    assert "in barrier" in on_demand[0]
    assert "torchrunx: last collective #1 gloo:barrier, not completed" in on_demand[0]
    assert "torchrunx: no collective yet" in on_demand[1]  # across hosts: rank 1 is one behind


def _dump(*frames: tuple[str, int, str]) -> str:
    """A faulthandler dump of one thread, innermost frame first."""
    lines = ["Current thread 0x00007f (most recent call first):"]
    lines += [f'  File "{path}", line {line} in {function}' for path, line, function in frames]
    return "\n".join(lines) + "\n"


def test_a_rank_is_placed_in_the_users_frames_never_ours_nor_plumbing(tmp_path: Path) -> None:
    import sysconfig

    from torchrunx.sources import PACKAGE
    from torchrunx.stack_report import innermost

    stdlib = sysconfig.get_paths()["stdlib"]

    worker = f"{PACKAGE}/worker.py"
    zmq_socket = f"{sysconfig.get_paths()['purelib']}/zmq/sugar/socket.py"
    train = str(tmp_path / "train.py")
    after_return = _dump(
        (zmq_socket, 813, "recv_multipart"),
        (worker, 262, "_recv"),
        (worker, 290, "_send_result"),
        (worker, 160, "execute"),
        (worker, 90, "run_worker"),
    )
    assert innermost(after_return) == "returned"
    at_prompt = _dump(
        (f"{stdlib}/cmd.py", 217, "onecmd"),
        (f"{stdlib}/pdb.py", 300, "_cmdloop"),
        (f"{PACKAGE}/debugger.py", 120, "interaction"),
        (train, 12, "train"),
        (worker, 150, "execute"),
        (worker, 90, "run_worker"),
    )
    assert innermost(at_prompt) == f"in the debugger at train ({train}:12)"
    starting = _dump(
        (zmq_socket, 813, "recv_multipart"),
        (worker, 262, "_recv"),
        (worker, 220, "_rendezvous"),
        (worker, 140, "execute"),
        (worker, 90, "run_worker"),
    )
    assert innermost(starting) == "starting"
    in_a_lock = _dump(("<frozen abc>", 123, "__subclasscheck__"), (train, 7, "step"))
    assert innermost(in_a_lock) == f"step ({train}:7)"


def test_ranks_that_failed_on_their_own_are_not_called_collateral() -> None:
    from torchrunx.outcome import Evidence, WorkerRaised, failure_exception
    from torchrunx.transport.messages import Raised

    same = [
        Raised("r", r, r, "builtins.ValueError", "bad batch", "tb", unpicklable="x") for r in (0, 1)
    ]
    failures = [WorkerRaised("h", m, []) for m in same]
    exc = failure_exception(failures, {}, ["h"], [2], Evidence())  # type: ignore[arg-type]
    assert exc.__notes__[-1].splitlines() == [
        "also in this run:",
        "  rank 1 (local rank 1) on h raised builtins.ValueError: bad batch",
    ]


def test_a_host_lost_after_a_rank_raised_leaves_the_rank_s_error_first() -> None:
    from torchrunx.outcome import AgentLost, Evidence, WorkerRaised, failure_exception
    from torchrunx.transport.messages import Raised

    raised = Raised("r", 2, 0, "builtins.ValueError", "bad batch", "tb", unpicklable="x")
    lost = AgentLost("b", "the agent on b sent nothing for 10 s")
    failures = [WorkerRaised("a", raised, []), lost]
    exc = failure_exception(failures, {}, ["a", "b"], [2, 2], Evidence())  # type: ignore[arg-type]
    assert "bad batch" in str(exc)
    assert "the agent on b sent nothing for 10 s" in exc.__notes__[-1]
    lost_first = failure_exception(failures[::-1], {}, ["a", "b"], [2, 2], Evidence())  # type: ignore[arg-type]
    assert isinstance(lost_first, torchrunx.AgentFailedError)


def raise_on_every_rank() -> None:
    msg = f"bad batch on rank {os.environ['RANK']}"
    raise ValueError(msg)


def test_ranks_that_raised_or_returned_are_never_placed_in_our_worker() -> None:
    """Dumps taken as ranks raise show the worker's plumbing (runpy, its own frames): the
    report says what the ranks did instead, whatever moment the dumps were taken."""
    with torchrunx.Launcher(workers_per_host=2, backend=None) as launcher:
        for _ in range(3):  # the moment of the dump varies from run to run
            with pytest.raises(ValueError, match="bad batch") as info:
                launcher.run(raise_on_every_rank)
            notes = "\n".join(info.value.__notes__)
            assert "runpy" not in notes, notes
            assert "worker.py" not in notes, notes
            culprit = next(r for r in (0, 1) if f"raised by rank {r} " in notes)
            other = f"rank {1 - culprit}"
            raised = f"  {other} (local rank {1 - culprit}) on localhost raised builtins.ValueError"
            placed = re.search(rf"^  {other}: (.*)$", notes, re.MULTILINE)
            assert (raised in notes) != bool(placed), notes  # it raised, or where it was

    from torchrunx.outcome import Evidence

    dump = 'Stack (most recent call first):\n  File "<frozen runpy>", line 88 in _run_code\n'
    evidence = Evidence(stacks={0: dump, 1: dump, 2: dump})
    assert evidence.report(raised=[0], returned=[1]).splitlines() == [
        "rank 1: returned",
        "rank 2: no Python frame",
    ]


def test_a_second_ctrl_c_keeps_the_report_and_raises_one_keyboard_interrupt(
    tmp_path: Path,
) -> None:
    script = tmp_path / "train.py"
    script.write_text(CTRL_C_SCRIPT)
    child = pexpect.spawn(
        sys.executable, [str(script)], cwd=str(tmp_path), timeout=60, encoding="utf-8"
    )
    try:
        child.expect_exact("stuck now")
        time.sleep(1)
        child.sendintr()
        time.sleep(0.02)
        child.sendintr()  # 20 ms later, while the run is torn down
        child.expect_exact("torchrunx: run cancelled; its ranks were at:")
        child.expect(r"rank 1: stuck_in_user_code \(train.py:\d+\)")
        child.expect(pexpect.EOF)
        tail = child.before
    finally:
        child.close(force=True)
    assert tail.count("KeyboardInterrupt") == 1, tail
    assert "During handling of the above exception" not in tail
