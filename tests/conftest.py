"""Shared fixtures: a warm launcher per module, and a check that no test leaves a process."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import psutil
import pytest

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Iterator

LEFTOVER_WAIT_S = 10.0


def _descendants() -> dict[int, psutil.Process]:
    found = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                found[p.pid] = p
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves behind a process it started (agents of shared launchers aside)."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while True:
        left = {pid: p for pid, p in _descendants().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = []
    for p in left.values():
        try:
            described.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
        p.kill()
    assert not described, f"processes left behind: {described}"


@pytest.fixture(autouse=True)
def _logs_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRUNX_LOG_DIR", str(tmp_path_factory.getbasetemp() / "logs"))


@pytest.fixture(scope="module")
def launcher() -> Iterator[torchrunx.Launcher]:
    """Two gloo workers on localhost, agents started before the module's tests."""
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        yield lau
