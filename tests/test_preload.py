"""Runs that import big libraries: what earlier runs imported is preloaded, by the rules.

A module counts as preloaded when it is in ``sys.modules`` the moment the function starts: the
worker was forked from a forkserver that had imported it.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import torchrunx
from torchrunx import forkserver

if TYPE_CHECKING:
    from collections.abc import Iterator

STDLIB = "colorsys"  # in the standard library, imported by nothing torch needs
LEARN_S = 90.0  # a learned forkserver imports torch again first: seconds on 2 busy cores


def had_then_import(name: str) -> bool:
    """Whether ``name`` was loaded before this function ran; imports it either way."""
    had = name in sys.modules
    __import__(name)
    return had


def preloaded_within(launcher: torchrunx.Launcher, name: str, seconds: float = LEARN_S) -> bool:
    """Run until a run's workers start with ``name`` loaded (True), or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(launcher.run(had_then_import, name).by_rank()):
            return True
        time.sleep(0.2)
    return False


def test_what_runs_import_is_preloaded_for_later_runs() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as lau:
        assert lau.run(had_then_import, STDLIB).by_rank() == [False, False]
        assert preloaded_within(lau, STDLIB)
        # torch._dynamo (pulled in by DistributedDataParallel) is preloaded from the start
        assert all(lau.run(had_then_import, "torch._dynamo").by_rank())


def test_the_users_own_files_are_never_preloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine_to_edit.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau:
        lau.run(had_then_import, "mine_to_edit")
        lau.run(had_then_import, STDLIB)
        assert preloaded_within(lau, STDLIB)  # learning happened, after both
        assert lau.run(had_then_import, "mine_to_edit").by_rank() == [False]


def test_a_run_with_another_environment_forks_from_a_fresh_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRX_TEST_SETTING", "a")
    launcher = torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=1,
        backend=None,
        copy_env_vars=("PATH", "TRX_TEST_*"),
    )
    with launcher:
        launcher.run(had_then_import, STDLIB)
        assert preloaded_within(launcher, STDLIB)
        monkeypatch.setenv("TRX_TEST_SETTING", "b")  # its modules would have read "a"
        assert launcher.run(had_then_import, STDLIB).by_rank() == [False]


@pytest.fixture
def threaded_module() -> Iterator[str]:
    """An installed module whose import starts a thread (as some clients of services do)."""
    name = f"trx_starts_a_thread_{os.getpid()}"
    path = Path(sysconfig.get_paths()["purelib"]) / f"{name}.py"
    path.write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    yield name
    path.unlink()


def test_a_module_that_starts_a_thread_is_never_preloaded(threaded_module: str) -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau:
        lau.run(had_then_import, threaded_module)
        lau.run(had_then_import, STDLIB)
        assert preloaded_within(lau, STDLIB)  # what came before it in the run was learned
        for _ in range(3):
            assert lau.run(had_then_import, threaded_module).by_rank() == [False]


def test_explicit_preload_is_there_from_the_first_run() -> None:
    launcher = torchrunx.Launcher(
        hostnames=["localhost"],
        workers_per_host=2,
        backend=None,
        preload=[STDLIB],
        learn_preload=False,
    )
    with launcher:
        assert launcher.run(had_then_import, STDLIB).by_rank() == [True, True]
        launcher.run(had_then_import, "wave")
        time.sleep(3)
        assert launcher.run(had_then_import, "wave").by_rank() == [False, False]  # not learned


@pytest.mark.parametrize("bad", ["transformers", ["no such"], [3], [""]])
def test_a_bad_preload_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"preload=.*: use a list of module names"):
        torchrunx.Launcher(preload=bad)  # type: ignore[arg-type]


def openmp_wait_settings() -> dict[str, str]:
    """The OpenMP wait settings a worker's environment holds."""
    return {k: v for k, v in os.environ.items() if k in forkserver.OPENMP_WAIT_VARS}


def test_workers_see_no_openmp_setting_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in forkserver.OPENMP_WAIT_VARS:
        monkeypatch.delenv(name, raising=False)
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend=None) as lau:
        assert lau.run(openmp_wait_settings).by_rank() == [{}, {}]


def test_openmp_spins_less_while_torch_loads_unless_the_user_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in forkserver.OPENMP_WAIT_VARS:
        monkeypatch.delenv(name, raising=False)
    with forkserver._sharing_cores():
        assert os.environ["GOMP_SPINCOUNT"] == forkserver.THROTTLED_SPINS
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    with forkserver._sharing_cores():
        assert openmp_wait_settings() == {"OMP_WAIT_POLICY": "active"}
    assert openmp_wait_settings() == {"OMP_WAIT_POLICY": "active"}


@pytest.fixture
def installed_module() -> Iterator[str]:
    """A module of an installed package that nothing else imports."""
    name = f"trx_installed_{os.getpid()}"
    path = Path(sysconfig.get_paths()["purelib"]) / f"{name}.py"
    path.write_text("VALUE = 1\n")
    yield name
    path.unlink()


def test_packages_in_a_venv_inside_the_working_directory_are_learned(
    installed_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as with a project's .venv: site-packages is below the working directory
    monkeypatch.chdir(Path(sysconfig.get_paths()["purelib"]).parent)
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau:
        assert lau.run(had_then_import, installed_module).by_rank() == [False]
        assert preloaded_within(lau, installed_module)
