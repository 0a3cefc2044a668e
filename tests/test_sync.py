"""``sync_dir`` and ``python``: hosts that do not share the launcher's filesystem.

The hosts here are test hosts in mount namespaces of their own, in which the folder of the
projects below is an empty tmpfs (the launcher's files do not exist there) and so is
``~/.cache/torchrunx`` (each host has its own cache, and nothing of ours is in it).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import torchrunx
import torchrunx.sync

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from testbed.cluster import Cluster

NOBODY = 65534


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the projects of this module live: a folder the test hosts do not see."""
    return tmp_path_factory.mktemp("projects")


@pytest.fixture(scope="module")
def isolated_cluster(cluster_factory: Callable[..., Cluster], projects: Path) -> Cluster:
    cache = Path.home() / ".cache" / "torchrunx"
    cache.mkdir(parents=True, exist_ok=True)
    return cluster_factory(2, private=[projects, cache])


@pytest.fixture
def isolated(isolated_cluster: Cluster) -> Iterator[Cluster]:
    """Two test hosts without our files; the test fails if it left a process on them."""
    yield isolated_cluster
    left = isolated_cluster.reset(wait=10.0)
    assert not left, f"processes left behind on the nodes: {left}"


@pytest.fixture
def project(
    projects: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A project of several modules, made the working directory and first on ``sys.path``.

    Its package has a name of its own per test (``pkg_<test>``): each test imports it afresh.
    """
    name: str = request.node.name
    root = projects / name
    package = f"pkg_{name.removeprefix('test_')}"
    write(root / package / "__init__.py", "")
    write(root / package / "config.py", "SCALE = 10\n")
    write(
        root / package / "train.py",
        f"""
        import os, socket
        from pathlib import Path
        from {package}.config import SCALE

        def train(x):
            data = Path("data/numbers.txt").read_text().split()
            return {{
                "host": socket.gethostname(),
                "value": x * SCALE + sum(map(int, data)),
                "cwd": os.getcwd(),
                "first_on_path": os.sys.path[0],
            }}
        """,
    )
    write(root / "data" / "numbers.txt", "1 2 3\n")
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    return root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def entry(project: Path, name: str = "train") -> Callable[..., Any]:
    """The project's function, imported here as the user's script would (pickled by reference)."""
    package = next(p.name for p in project.iterdir() if p.name.startswith("pkg_"))
    importlib.invalidate_caches()
    return getattr(importlib.import_module(f"{package}.train"), name)  # type: ignore[no-any-return]


def launcher_on(cluster: Cluster, **fields: Any) -> torchrunx.Launcher:
    fields.setdefault("sync_dir", True)
    return torchrunx.Launcher(
        hostnames=cluster.hostnames,
        workers_per_host=1,
        backend="gloo",
        ssh_config_file=cluster.ssh_config,
        **fields,
    )


def test_without_sync_dir_the_hosts_lack_our_folder(isolated: Cluster, project: Path) -> None:
    with pytest.raises(torchrunx.AgentFailedError, match=r"does not exist on node\d.*sync_dir"):
        launcher_on(isolated, sync_dir=False).start().close()


def test_a_project_of_several_modules_runs_in_the_hosts_copies(
    isolated: Cluster, project: Path
) -> None:
    with launcher_on(isolated) as launcher:
        result = launcher.run(entry(project), 4)
    for host in isolated.hostnames:
        (got,) = result.results[host]
        assert got["host"] == host
        assert got["value"] == 4 * 10 + 6
        assert got["cwd"] != str(project)
        assert got["cwd"].startswith(str(Path.home() / ".cache" / "torchrunx" / "copies"))
        assert got["first_on_path"] == got["cwd"]


def test_a_traceback_names_the_users_files_not_the_hosts_copies(
    isolated: Cluster, project: Path
) -> None:
    package = next(project.glob("pkg_*"))
    write(package / "broken.py", "def fail():\n    return 1 / 0\n")
    fail = getattr(importlib.import_module(f"{package.name}.broken"), "fail")  # noqa: B009
    with launcher_on(isolated) as launcher, pytest.raises(ZeroDivisionError) as raised:
        launcher.run(fail)
    remote = str(raised.value.__cause__)
    assert f'File "{package}/broken.py", line 2, in fail' in remote
    assert ".cache/torchrunx/copies" not in remote


def test_a_hung_ranks_stack_names_the_users_files(isolated: Cluster, project: Path) -> None:
    package = next(project.glob("pkg_*"))
    write(package / "stuck.py", "import time\n\ndef stuck():\n    time.sleep(60)\n")
    stuck = getattr(importlib.import_module(f"{package.name}.stuck"), "stuck")  # noqa: B009
    with launcher_on(isolated) as launcher:
        handle = launcher.submit(stuck)
        deadline = time.monotonic() + 30
        dumps: dict[int, str] = {}
        while f"{package}/stuck.py" not in dumps.get(1, "") and time.monotonic() < deadline:
            dumps = handle.stacks()  # until rank 1 is in the function
            time.sleep(0.2)
        handle.cancel()
    assert f'File "{package}/stuck.py", line 4 in stuck' in dumps[1]
    assert ".cache/torchrunx/copies" not in dumps[1]


def test_an_edit_between_runs_arrives_and_only_it_travels(
    isolated: Cluster, project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="torchrunx.sync")
    config = next(project.glob("pkg_*/config.py"))
    with launcher_on(isolated) as launcher:
        assert launcher.run(entry(project), 1).rank(0)["value"] == 16
        caplog.clear()
        assert launcher.run(entry(project), 1).rank(0)["value"] == 16
        assert not caplog.records, "an unchanged folder was sent again"

        config.write_text("SCALE = 100\n")
        (project / "data" / "numbers.txt").unlink()
        write(project / "data" / "numbers.txt", "5\n")
        assert launcher.run(entry(project), 1).rank(0)["value"] == 105
        sent = dict.fromkeys(isolated.hostnames, 0)  # in one update, or two: the standby set's
        for record in caplog.records:  # (made as the last run ended) and this run's
            if hasattr(record, "received"):
                sent[record.hostname] += record.received  # type: ignore[attr-defined]
        assert sent == {h: len("SCALE = 100\n") + len("5\n") for h in isolated.hostnames}


def test_an_edit_of_the_same_size_in_the_same_second_is_seen(
    isolated: Cluster, project: Path
) -> None:
    # CPython trusts a cached .pyc by the source's whole-second mtime and size: the copy drops
    # the bytecode of a file it rewrites, or such an edit would run the old code
    config = next(project.glob("pkg_*/config.py"))
    with launcher_on(isolated) as launcher:
        for scale in (20, 30, 40, 50, 60):
            config.write_text(f"SCALE = {scale}\n")  # the same size each time
            assert launcher.run(entry(project), 1).rank(0)["value"] == scale + 6


def test_files_gone_here_go_there_but_what_runs_wrote_stays(
    isolated: Cluster, project: Path
) -> None:
    def listing() -> list[str]:
        return sorted(str(p) for p in Path().rglob("*") if p.is_file())

    def write_output() -> None:
        Path("outputs").mkdir(exist_ok=True)
        Path("outputs/result.txt").write_text("made on the host")

    def folders() -> list[str]:
        return sorted(str(p) for p in Path().rglob("*") if p.is_dir())

    write(project / "old.py", "")
    write(project / "gone" / "deep" / "old.txt", "x")
    with launcher_on(isolated) as launcher:
        launcher.run(write_output)
        (project / "old.py").unlink()
        shutil.rmtree(project / "gone")  # a folder removed here
        files = launcher.run(listing).rank(0)
        there = launcher.run(folders).rank(0)
    assert "old.py" not in files
    assert "outputs/result.txt" in files
    assert "data/numbers.txt" in files
    assert "gone" not in there  # removed here, so gone there
    assert "gone/deep" not in there
    assert "outputs" in there


def test_a_large_file_arrives_intact(isolated: Cluster, project: Path) -> None:
    big = project / "weights.bin"
    with big.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()

    def digest() -> str:
        return hashlib.sha256(Path("weights.bin").read_bytes()).hexdigest()

    with launcher_on(isolated) as launcher:
        assert launcher.run(digest).results == {h: [expected] for h in isolated.hostnames}


def test_excludes_hold(isolated: Cluster, project: Path) -> None:
    write(project / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(project / "myenv" / "pyvenv.cfg", "home = /usr/bin\n")
    write(project / "myenv" / "lib" / "site.py", "")
    write(project / "__pycache__" / "x.cpython-311.pyc", "")
    write(project / "torchrunx_logs" / "run.log", "")
    write(project / "runs" / "run.log", "")
    write(project / "data" / "big.ckpt", "")
    write(project / "data" / "keep.ckpt", "")
    write(project / "secret.txt", "")

    def listing() -> list[str]:
        copied = (p for p in Path().rglob("*") if "__pycache__" not in p.parts)  # the run's own
        return sorted(str(p) for p in copied if p.is_file())

    exclude = ["*.ckpt", "!keep.ckpt", "/secret.txt"]
    with launcher_on(isolated, sync_exclude=exclude, log_dir=project / "runs") as launcher:
        files = launcher.run(listing).rank(0)
    package = next(project.glob("pkg_*")).name
    code = [f"{package}/{name}.py" for name in ("__init__", "config", "train")]
    assert files == sorted(["data/keep.ckpt", "data/numbers.txt", *code])


def test_the_copies_are_private_to_their_user(isolated: Cluster, project: Path) -> None:
    def as_nobody() -> dict[str, Any]:
        cache = Path.home() / ".cache" / "torchrunx"
        config = next(Path().glob("pkg_*/config.py")).resolve()
        tries = [["ls", str(cache / "copies")], ["cat", str(config)]]
        runs = [subprocess.run(t, user=NOBODY, capture_output=True, check=False) for t in tries]
        return {
            "mode": cache.stat().st_mode & 0o777,
            "denied": [b"Permission denied" in r.stderr for r in runs],
            "root_reads": config.read_text(),
        }

    with launcher_on(isolated) as launcher:
        got = launcher.run(as_nobody).rank(0)
    assert got["mode"] == 0o700
    assert got["denied"] == [True, True]
    assert got["root_reads"] == "SCALE = 10\n"


def test_python_names_the_hosts_interpreter(
    isolated: Cluster, project: Path, tmp_path: Path
) -> None:
    wrapper = tmp_path / "python-of-the-hosts"
    wrapper.write_text(f'#!/bin/sh\nTRX_BY_WRAPPER=yes exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)

    def via() -> str | None:
        return os.environ.get("TRX_BY_WRAPPER")

    one = {isolated.hostnames[0]: str(wrapper)}
    with launcher_on(isolated, python=one) as launcher:
        assert launcher.run(via).results == dict(
            zip(isolated.hostnames, [["yes"], [None]], strict=True)
        )

    with pytest.raises(torchrunx.AgentFailedError, match=r"/no/python \(Launcher.python\) is not"):
        launcher_on(isolated, python="/no/python").start()


def test_bad_fields_are_refused_early(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sync_dir=.*use True"):
        torchrunx.Launcher(sync_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"sync_exclude=.*gitignore"):
        torchrunx.Launcher(sync_dir=True, sync_exclude="*.ckpt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"python=.*path of a Python"):
        torchrunx.Launcher(python="")
    with pytest.raises(ValueError, match=r"python names hosts \['nod1'\]"):
        torchrunx.Launcher(hostnames=["localhost"], python={"nod1": "/usr/bin/python3"}).start()


def test_on_the_launchers_own_host_the_folder_is_used_in_place(project: Path) -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, sync_dir=True) as lau:
        assert lau.run(entry(project), 0).rank(0)["cwd"] == str(project)


def test_a_sub_folder_of_the_project_is_copied_alone(isolated: Cluster, project: Path) -> None:
    package = next(project.glob("pkg_*"))

    def where() -> tuple[str, list[str]]:
        return str(Path.cwd()), sorted(p.name for p in Path().iterdir())

    with launcher_on(isolated, sync_dir=package) as launcher:
        cwd, names = launcher.run(where).rank(0)
    assert Path(cwd).name.startswith(f"{package.name}-")  # the copy's root: ours is outside it
    assert names == ["__init__.py", "config.py", "train.py"]


def test_a_large_folder_is_said_to_be_so(
    project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torchrunx.sync, "LARGE_FOLDER_FILES", 3)  # the project has 4 files
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, sync_dir=True):
        pass
    (warning,) = [r for r in caplog.records if r.name == "torchrunx.sync"]
    assert warning.levelno == logging.WARNING
    assert f"{project} holds 4 files" in warning.getMessage()
