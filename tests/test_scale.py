"""Many hosts at once: a busy sshd's dropped handshakes, and the launcher's open-files limit."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from typing import TYPE_CHECKING

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from testbed.cluster import Cluster


def aliases_of(
    cluster: Cluster, node: str, n: int, folder: Path, jump: str | None = None
) -> tuple[list[str], Path]:
    """``n`` host names that all reach ``node`` (as hosts behind one bastion do), each through
    ``jump`` if given, and their config."""
    config = cluster.ssh_config.read_text()
    block = next(b for b in config.split("\n\n") if b.startswith(f"Host {node}\n"))
    names = [f"alias{i}" for i in range(n)]
    via = f"\n    ProxyJump {jump}" if jump else ""
    extra = "".join(
        block.replace(f"Host {node}\n", f"Host {name}\n") + via + "\n\n" for name in names
    )
    path = folder / "ssh_config"
    path.write_text(config + extra)
    return names, path


def test_handshakes_a_busy_sshd_drops_are_retried(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    # MaxStartups 1: while one handshake is in progress, sshd drops every other connection
    busy = cluster_factory(1, max_startups="1")
    names, config = aliases_of(busy, "node1", 4, tmp_path)
    launcher = torchrunx.Launcher(
        hostnames=names, workers_per_host=1, backend=None, ssh_config_file=config
    )
    with launcher:
        result = launcher.run(socket.gethostname)
    assert result.results == {name: ["node1"] for name in names}
    log = (busy.state_dir / "nodes" / "node1" / "sshd.log").read_text()
    assert "past MaxStartups" in log, "no handshake was dropped: the test proves nothing"
    assert not busy.wait_no_processes(timeout=10)


@contextlib.contextmanager
def startup_held(
    cluster: Cluster, i: int, seconds: float, until: Callable[[], bool] | None = None
) -> Iterator[None]:
    """Node i's sshd (MaxStartups 1) drops every handshake for ``seconds``, or until ``until()``:
    a connection that never logs in holds its one startup."""
    held = socket.create_connection((cluster.ips[i], cluster.port), timeout=5)
    assert held.recv(64).startswith(b"SSH-")  # sshd took it: a startup from now on
    done = threading.Event()

    def release() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(0.05) and time.monotonic() < deadline and not (until and until()):
            pass
        held.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_handshakes_a_busy_bastion_drops_are_retried(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    busy = cluster_factory(2, max_startups="1")
    names, config = aliases_of(busy, "node2", 4, tmp_path, jump="node1")
    bastion_log, node2_log = (busy.state_dir / "nodes" / h / "sshd.log" for h in busy.hostnames)

    def node2_dropped_one() -> bool:
        return "past MaxStartups" in node2_log.read_text()

    launcher = torchrunx.Launcher(
        hostnames=names, workers_per_host=1, backend=None, ssh_config_file=config, agent_timeout=60
    )
    # the bastion drops every handshake for longer than its ConnectTimeout (5 s); node2 drops
    # those that come through the bastion until it has dropped one
    with (
        startup_held(busy, 0, seconds=6.0),
        startup_held(busy, 1, seconds=30.0, until=node2_dropped_one),
        launcher,
    ):
        result = launcher.run(socket.gethostname)
    assert result.results == {name: ["node2"] for name in names}
    assert "past MaxStartups" in bastion_log.read_text(), "the bastion dropped no handshake"
    drop = next(line for line in node2_log.read_text().splitlines() if "past MaxStartups" in line)
    assert f"from [{busy.ips[0]}]" in drop, "node2 dropped no handshake that came through node1"
    assert not busy.wait_no_processes(timeout=10)


def test_a_launcher_with_remote_hosts_raises_its_open_files_limit(cluster: Cluster) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        config = cluster.ssh_config
        launcher = torchrunx.Launcher(hostnames=["node1"], backend=None, ssh_config_file=config)
        with launcher:
            launcher.run(socket.gethostname)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
