"""Many hosts at once: a busy sshd's dropped handshakes, and the launcher's open-files limit."""

from __future__ import annotations

import resource
import socket
import threading
import time
from typing import TYPE_CHECKING

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Callable
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


def hold_the_startup(cluster: Cluster, i: int) -> socket.socket:
    """A connection that never logs in: with MaxStartups 1, node i's sshd drops every other."""
    held = socket.create_connection((cluster.ips[i], cluster.port), timeout=5)
    assert held.recv(64).startswith(b"SSH-")  # sshd took it: it counts as a startup from now on
    return held


def release_when(held: socket.socket, ready: Callable[[], bool], limit: float) -> threading.Thread:
    """Close ``held`` once ``ready()`` (or after ``limit`` s), in the background."""

    def wait() -> None:
        deadline = time.monotonic() + limit
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        held.close()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_handshakes_a_busy_bastion_drops_are_retried(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    busy = cluster_factory(2, max_startups="1")
    names, config = aliases_of(busy, "node2", 4, tmp_path, jump="node1")
    logs = [busy.state_dir / "nodes" / host / "sshd.log" for host in busy.hostnames]
    # the bastion drops every handshake for longer than its ConnectTimeout (5 s); then node2
    # drops those that come through the bastion until it has dropped one
    releases = [
        release_when(hold_the_startup(busy, 0), lambda: False, limit=6.0),
        release_when(
            hold_the_startup(busy, 1), lambda: "past MaxStartups" in logs[1].read_text(), 30.0
        ),
    ]
    launcher = torchrunx.Launcher(
        hostnames=names, workers_per_host=1, backend=None, ssh_config_file=config, agent_timeout=60
    )
    with launcher:
        result = launcher.run(socket.gethostname)
    for thread in releases:
        thread.join()
    assert result.results == {name: ["node2"] for name in names}
    assert "past MaxStartups" in logs[0].read_text(), "the bastion dropped no handshake"
    drop = next(line for line in logs[1].read_text().splitlines() if "past MaxStartups" in line)
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
