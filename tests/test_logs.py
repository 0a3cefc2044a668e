"""Worker and agent output: live view, files, logging records, floods and crashes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import torchrunx
from torchrunx.logs import RedirectHandler, get_handler_filter

if TYPE_CHECKING:
    from collections.abc import Iterator


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.fixture
def log_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "logs"
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[torchrunx.Launcher]:
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend=None, log_dir=""
    ) as launcher:
        yield launcher


def speak() -> None:
    rank = os.environ["RANK"]
    print(f"out-{rank}")
    print(f"err-{rank}", file=sys.stderr)
    os.write(1, f"fd1-{rank}\n".encode())  # as C code writes, past Python's buffers
    logging.getLogger("my_app").warning("warned %s", rank)
    logging.getLogger("my_app.sub").info("informed %s", rank)
    logging.getLogger("my_app").debug("not at the default level %s", rank)


def test_rank_0_is_live_with_prefix_and_stderr_stays_stderr(
    two: torchrunx.Launcher, capfd: pytest.CaptureFixture[str]
) -> None:
    two.set_logging_handlers("auto")
    two.run(speak)
    out, err = capfd.readouterr()
    assert "[localhost:0] out-0" in out.splitlines()
    assert "[localhost:0] fd1-0" in out.splitlines()
    assert "[localhost:0] err-0" in err.splitlines()
    assert "[localhost:0] warned 0" in err.splitlines()
    assert "-1" not in out + err  # rank 1 is not shown live by default


def test_live_ranks_chooses_who_is_shown(capfd: pytest.CaptureFixture[str]) -> None:
    for live, shown in ((1, {"1"}), ([0, 1], {"0", "1"}), ("all", {"0", "1"})):
        with torchrunx.Launcher(
            hostnames=["localhost"], workers_per_host=2, backend=None, log_dir="", live_ranks=live
        ) as launcher:
            launcher.run(speak)
        out, _ = capfd.readouterr()
        assert {line[-1] for line in out.splitlines() if "out-" in line} == shown


def records_of(
    launcher: torchrunx.Launcher | torchrunx.LauncherView, fn: Any, *args: Any
) -> list[logging.LogRecord]:
    """Every record of ``fn``'s run, through a handler in place of the defaults."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    owner = launcher if isinstance(launcher, torchrunx.Launcher) else launcher.launcher
    owner.set_logging_handlers(lambda: [Collect()])
    try:
        launcher.run(fn, *args)
    finally:
        owner.set_logging_handlers("auto")
    return records


def test_worker_logging_keeps_logger_names_and_levels(two: torchrunx.Launcher) -> None:
    records = records_of(two, speak)
    mine = {
        (r.name, r.levelno, r.getMessage(), r.hostname, r.local_rank)  # type: ignore[attr-defined]
        for r in records
        if r.name.startswith("my_app")
    }
    assert mine == {
        (name, level, f"{text} {rank}", "localhost", rank)
        for rank in (0, 1)
        for name, level, text in (
            ("my_app", logging.WARNING, "warned"),
            ("my_app.sub", logging.INFO, "informed"),
        )
    }
    prints = [r for r in records if r.getMessage() == "out-1"]
    assert [(p.name, p.levelno, p.stream) for p in prints] == [  # type: ignore[attr-defined]
        ("torchrunx.localhost.1", logging.INFO, "stdout")
    ]


def log_through_handlers_of_its_own(folder: str) -> None:
    # as Lightning does: a stream handler on its own logger, records still propagating
    printed = logging.getLogger("lib_prints")
    printed.addHandler(logging.StreamHandler())  # stderr
    printed.warning("printed by the library")
    filed = logging.getLogger("lib_files")
    filed.addHandler(logging.FileHandler(f"{folder}/lib.log"))
    filed.warning("filed by the library")


def test_a_record_that_a_library_prints_itself_arrives_once(
    two: torchrunx.Launcher, tmp_path: Path
) -> None:
    records = records_of(
        two.view(workers_per_host=1), log_through_handlers_of_its_own, str(tmp_path)
    )
    seen = [(r.name, r.getMessage()) for r in records if "by the library" in r.getMessage()]
    assert seen == [
        ("torchrunx.localhost.0", "printed by the library"),  # the library's own line, once
        ("lib_files", "filed by the library"),  # a file is not the terminal: the record comes
    ]
    assert (tmp_path / "lib.log").read_text() == "filed by the library\n"


def test_files_one_folder_per_run_per_agent_and_worker(log_root: Path) -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as launcher:
        launcher.run(speak)
        launcher.run(speak)  # same second: still a folder of its own
        launcher.run(int)  # silent: its files exist all the same, empty
    first, second, silent = run_dirs(log_root)
    assert first.name != second.name
    assert [p.stat().st_size for p in sorted(silent.iterdir())] == [0, 0, 0]
    assert sorted(p.name for p in first.iterdir()) == [
        "localhost.log",
        "localhost[0].log",
        "localhost[1].log",
    ]
    worker1 = (first / "localhost[1].log").read_text()
    for text in (
        "out-1",
        "err-1",
        "fd1-1",
        "WARNING my_app: warned 1",
        "INFO my_app.sub: informed 1",
    ):
        assert text in worker1
    assert "not at the default level" not in worker1
    agent = (first / "localhost.log").read_text()
    assert "out-0" in agent
    assert "out-1" not in agent


def test_log_level_and_log_dir_choices(log_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_LEVEL", "DEBUG")
    torchrunx.launch(speak, hostnames=["localhost"], workers_per_host=1, backend=None)
    (folder,) = run_dirs(log_root)
    assert "not at the default level 0" in (folder / "localhost[0].log").read_text()

    monkeypatch.setenv("TORCHRUNX_LOG_DIR", "")
    torchrunx.launch(speak, hostnames=["localhost"], workers_per_host=1, backend=None)
    assert len(run_dirs(log_root)) == 1  # "" writes no files

    elsewhere = log_root.parent / "elsewhere"
    torchrunx.launch(speak, logs=str(elsewhere), hostnames=["localhost"], workers_per_host=1)
    assert len(run_dirs(elsewhere)) == 1  # the argument wins over the variable


def test_redirect_and_filter_helpers(two: torchrunx.Launcher) -> None:
    seen: list[str] = []
    target = logging.getLogger("torchrunx.localhost.1")
    catcher = logging.Handler()
    catcher.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    target.addHandler(catcher)
    target.setLevel(logging.INFO)
    try:

        def handlers() -> list[logging.Handler]:
            redirect = RedirectHandler()
            redirect.addFilter(get_handler_filter("localhost", 1))
            return [redirect]

        two.set_logging_handlers(handlers)
        two.run(speak)
    finally:
        two.set_logging_handlers("auto")
        target.removeHandler(catcher)
    assert "out-1" in seen
    assert "out-0" not in seen


def flood_then_die(n: int, folder: str) -> None:
    rank = int(os.environ["RANK"])
    for i in range(n):
        print(f"{rank}:{i}")
    Path(folder, f"done.{rank}").touch()
    if rank == 1:
        deadline = time.monotonic() + 60
        while not Path(folder, "done.0").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # rank 0 finishes too: the crash would stop it otherwise
        os.write(2, b"last words \xff\xfe not utf-8\n")
        sys.stdout.write("no newline at the end")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_flood_then_crash_loses_nothing(log_root: Path) -> None:
    n = 100_000
    with (
        torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as launcher,
        pytest.raises(torchrunx.WorkerFailedError) as info,
    ):
        launcher.run(flood_then_die, n, str(log_root.parent))
    assert "last words" in str(info.value)
    assert "no newline at the end" in str(info.value)
    (folder,) = run_dirs(log_root)
    for rank in (0, 1):
        lines = (folder / f"localhost[{rank}].log").read_bytes().split(b"\n")
        numbered = [line.rsplit(b" ", 1)[-1] for line in lines if f": {rank}:".encode() in line]
        assert numbered == [f"{rank}:{i}".encode() for i in range(n)]
    # the last two lines, after every numbered one: stderr's and stdout's (two pipes, so
    # their order between each other is not defined), the very bytes, the partial line whole
    worker1 = (folder / "localhost[1].log").read_bytes().split(b"\n")
    last = sorted(line.split(b": ", 1)[1] for line in worker1[-3:-1])
    assert worker1[-1] == b""
    assert last == [b"last words \xff\xfe not utf-8", b"no newline at the end"]


def flood_forever_or_fail(stamp: str) -> None:
    if os.environ["RANK"] == "1":
        time.sleep(1)
        Path(stamp).write_text(repr(time.time()))
        msg = "raised while rank 0 floods"
        raise ValueError(msg)
    while True:
        print("x" * 100)


def test_flooding_worker_does_not_delay_failures(log_root: Path) -> None:
    stamp = log_root.parent / "raised-at"
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as launcher:
        with pytest.raises(ValueError, match="raised while rank 0 floods"):
            launcher.run(flood_forever_or_fail, str(stamp))
        delay = time.time() - float(stamp.read_text())
    assert delay < 2.0  # tens of milliseconds on an idle machine; a flood loads both cores


# ---- progress bars: redrawn lines

BAR_SCRIPT = """
import sys
import time
from pathlib import Path

import torchrunx
from tqdm import tqdm


def train(stamps):
    for i in tqdm(range(20), desc="epoch", mininterval=0):
        Path(stamps, str(i)).write_text(repr(time.time()))
        time.sleep(0.15)
    return 1


print(torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None,
                         log_dir=sys.argv[2]).run(train, sys.argv[1]).by_rank())
"""


def test_a_progress_bar_is_live_and_files_get_its_end(tmp_path: Path) -> None:
    import pexpect

    script, stamps, logs = tmp_path / "bar.py", tmp_path / "stamps", tmp_path / "logs"
    script.write_text(BAR_SCRIPT)
    stamps.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = pexpect.spawn(
        sys.executable, [str(script), str(stamps), str(logs)], env=env, encoding="utf-8"
    )
    seen: dict[int, float] = {}
    try:
        while True:
            i = child.expect([r"\r\x1b\[2K\[localhost:0\] epoch:\s+\d+%[^\r\n]*?(\d+)/20", "EOF"])
            if i == 1 or child.match.group(1) == "20":
                break
            seen.setdefault(int(child.match.group(1)), time.time())
        child.expect_exact("[1]", timeout=60)
    finally:
        child.close(force=True)
    assert len(seen) >= 10  # drawn step by step, not once at the end
    lags = [seen[i] - float((stamps / str(i)).read_text()) for i in seen if i > 0]
    assert sorted(lags)[len(lags) // 2] < 0.5, lags  # on the terminal as the worker draws it
    (run,) = logs.iterdir()
    bar_lines = [x for x in (run / "localhost[0].log").read_text().splitlines() if "epoch" in x]
    assert len(bar_lines) == 1  # its end, once
    assert "20/20" in bar_lines[0]
    assert "\r" not in bar_lines[0]


def test_a_progress_bar_through_a_pipe_is_its_end_once(capfd: pytest.CaptureFixture[str]) -> None:
    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=1, backend=None, log_dir=""
    ) as launcher:
        launcher.run(draw_bar)
    err = capfd.readouterr().err
    assert err.count("[localhost:0] ") == 1, err
    assert "step 9/10" in err
    assert "step 3/10" not in err


def draw_bar() -> None:
    for i in range(10):
        sys.stderr.write(f"\rstep {i}/10")
        sys.stderr.flush()
        time.sleep(0.05)
    sys.stderr.write("\n")


TWO_BARS = """
import sys
import time

import torch.distributed as dist
import torchrunx


def two_bars():
    for i in range(30):
        sys.stderr.write(f"\\rstep {i}/30 of rank {dist.get_rank()}")
        sys.stderr.flush()
        if i == 15 and dist.get_rank() == 0:
            print("halfway", flush=True)
        time.sleep(0.05)
    sys.stderr.write("\\n")


torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo", log_dir="",
                   live_ranks="all").run(two_bars)
print("done")
"""


def test_bars_of_two_ranks_each_keep_a_line_on_a_real_terminal(tmp_path: Path) -> None:
    import pexpect
    import pyte

    script = tmp_path / "bars.py"
    script.write_text(TWO_BARS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = pexpect.spawn(sys.executable, [str(script)], env=env, dimensions=(40, 120))
    screen = pyte.Screen(120, 40)
    stream = pyte.ByteStream(screen)
    try:
        child.expect(pexpect.EOF, timeout=60)  # all it wrote is in child.before
        stream.feed(child.before)
    finally:
        child.close(force=True)
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert shown.count("[localhost:0] halfway") == 1
    for rank in (0, 1):
        assert shown.count(f"[localhost:{rank}] step 29/30 of rank {rank}") == 1, shown
    assert not [line for line in shown if "step 1" in line or "step 2/" in line], shown
    assert shown[-1] == "done"
