"""Shared fixtures: a warm launcher per module, a check that no test leaves a process, and
clusters of fake hosts (network namespaces with sshd, see testbed/cluster.py) for multi-host tests,
also as a SLURM cluster (see testbed/slurm.py)."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import torchrunx
from testbed.cluster import Cluster, ClusterUnavailableError
from testbed.slurm import SlurmCluster, SlurmUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LEFTOVER_WAIT_S = 10.0
CLUSTER_FIXTURES = {
    "cluster",
    "shared_cluster",
    "cluster_factory",
    "slurm",
    "slurm_factory",
    "shared_slurm_preemption",
    "slurm_preemption",
}
SHARED_CLUSTER_NODES = 4
SLURM_NODES = 3
SLURM_PREEMPTION_NODES = 2


def _descendants() -> dict[int, psutil.Process]:
    found = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                found[p.pid] = p
    return found


def _forkserver_of(p: psutil.Process, agents: set[int]) -> bool:
    """A forkserver that an agent which was already there started (it learns while serving)."""
    with contextlib.suppress(psutil.Error):
        return p.ppid() in agents and "torchrunx.forkserver" in p.cmdline()
    return False


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves behind a process it started (agents of shared launchers aside)."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while True:
        left = {
            pid: p
            for pid, p in _descendants().items()
            if pid not in before and not _forkserver_of(p, before)
        }
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a cluster `multihost`, so `-m "not multihost"` leaves them out."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.multihost)


@pytest.fixture(scope="session")
def cluster_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Cluster]]:
    """`make(n, **options)` starts a cluster of n fake hosts (options: of `Cluster.up`); all are
    torn down at the end of the session.

    Skips the test where this machine cannot host one (not root, no network namespaces).
    """
    made: list[Cluster] = []

    def make(n: int, **options: Any) -> Cluster:
        try:
            cl = Cluster.up(n, state_dir=tmp_path_factory.mktemp("cluster"), **options)
        except ClusterUnavailableError as e:
            pytest.skip(f"no multi-host cluster on this machine: {e}")
        made.append(cl)
        return cl

    yield make
    for cl in made:
        cl.down()


@pytest.fixture(scope="session")
def shared_cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """Four fake hosts for the whole session (for module-scoped fixtures; no per-test cleanup)."""
    return cluster_factory(SHARED_CLUSTER_NODES)


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared four-host cluster, handed back healthy after the test.

    Partitions are healed and stopped sshds restarted; the test fails if it left a process on a
    node (which is then killed).
    """
    yield shared_cluster
    left = shared_cluster.reset(wait=LEFTOVER_WAIT_S)
    assert not left, f"processes left behind on the nodes: {left}"


@pytest.fixture(scope="session")
def slurm_factory(
    cluster_factory: Callable[..., Cluster], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SlurmCluster]]:
    """`make(n, **options)` starts SLURM on a new cluster of n fake hosts (options: of
    `SlurmCluster.up`, e.g. `preemption=True`); all are stopped at session end.

    Skips the test where this machine cannot run one (not root, SLURM not installable).
    """
    made: list[SlurmCluster] = []

    def make(n: int, **options: Any) -> SlurmCluster:
        hosts = cluster_factory(n)
        try:
            sl = SlurmCluster.up(hosts, tmp_path_factory.mktemp("slurm"), **options)
        except SlurmUnavailableError as e:
            pytest.skip(f"no SLURM cluster on this machine: {e}")
        made.append(sl)
        return sl

    yield make
    for sl in made:
        sl.down()


@pytest.fixture(scope="session")
def slurm(slurm_factory: Callable[..., SlurmCluster]) -> SlurmCluster:
    """SLURM on three fake hosts of its own (node1..node3), for the whole session.

    Client commands need `slurm.env`; jobs run as root on the nodes. Tests must not stop its
    daemons; `slurm.reset()` cancels the jobs a test left and kills what they still run.
    """
    return slurm_factory(SLURM_NODES)


@pytest.fixture(scope="session")
def shared_slurm_preemption(slurm_factory: Callable[..., SlurmCluster]) -> SlurmCluster:
    """SLURM with preemption on two fake hosts of its own, for the whole session: partitions
    `low` (the default; its jobs are preempted after a GraceTime of `.grace_time` s) and `high`
    (see testbed/slurm.py). Tests must not stop its daemons."""
    return slurm_factory(SLURM_PREEMPTION_NODES, preemption=True)


@pytest.fixture
def slurm_preemption(shared_slurm_preemption: SlurmCluster) -> Iterator[SlurmCluster]:
    """The shared SLURM cluster with preemption, handed back without jobs after the test.

    The test fails if a process of its jobs was still running on a node (which is then killed).
    """
    yield shared_slurm_preemption
    left = shared_slurm_preemption.reset(wait=LEFTOVER_WAIT_S)
    assert not left, f"job processes left on the nodes: {left}"
