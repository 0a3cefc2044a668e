"""Many hosts at once: a busy sshd's dropped handshakes, and the launcher's open-files limit."""

from __future__ import annotations

import resource
import socket
from typing import TYPE_CHECKING

import torchrunx

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from testbed.cluster import Cluster


def aliases_of_node1(cluster: Cluster, n: int, folder: Path) -> tuple[list[str], Path]:
    """``n`` host names that all reach node 1 (as hosts behind one bastion do), and their config."""
    config = cluster.ssh_config.read_text()
    block = next(b for b in config.split("\n\n") if b.startswith("Host node1\n"))
    names = [f"alias{i}" for i in range(n)]
    extra = "".join(block.replace("Host node1\n", f"Host {name}\n") + "\n\n" for name in names)
    path = folder / "ssh_config"
    path.write_text(config + extra)
    return names, path


def test_handshakes_a_busy_sshd_drops_are_retried(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    # MaxStartups 1: while one handshake is in progress, sshd drops every other connection
    busy = cluster_factory(1, max_startups="1")
    names, config = aliases_of_node1(busy, 4, tmp_path)
    launcher = torchrunx.Launcher(
        hostnames=names, workers_per_host=1, backend=None, ssh_config_file=config
    )
    with launcher:
        result = launcher.run(socket.gethostname)
    assert result.results == {name: ["node1"] for name in names}
    log = (busy.state_dir / "nodes" / "node1" / "sshd.log").read_text()
    assert "past MaxStartups" in log, "no handshake was dropped: the test proves nothing"
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
