"""The multi-host test bed itself (testbed/cluster.py): ssh to every node, traffic between
hosts, faults, and a teardown that leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import psutil
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from testbed.cluster import Cluster

pytestmark = pytest.mark.multihost


def connect(cl: Cluster, host: str) -> paramiko.SSHClient:
    """Connect the way a launcher reading the cluster's ssh_config would: known host keys only."""
    cfg = paramiko.SSHConfig.from_path(str(cl.ssh_config)).lookup(host)
    client = paramiko.SSHClient()
    client.load_host_keys(cfg["userknownhostsfile"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        cfg["hostname"],
        port=int(cfg["port"]),
        username=cfg["user"],
        key_filename=cfg["identityfile"],
        look_for_keys=False,
        allow_agent=False,
        timeout=float(cfg["connecttimeout"]),
    )
    return client


def run(client: paramiko.SSHClient, command: str, **env: str) -> str:
    _, out, err = client.exec_command(command, timeout=10, environment=env or None)
    text: str = out.read().decode()
    status = out.channel.recv_exit_status()
    assert status == 0, f"{command!r} exited with {status}: {err.read().decode()}"
    return text


def ssh_banner(ip: str, timeout: float = 2.0) -> bytes:
    with socket.create_connection((ip, 22), timeout=timeout) as s:
        return s.recv(8)


def running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_every_node_answers_as_itself(cluster: Cluster) -> None:
    def check(i: int) -> str:
        client = connect(cluster, cluster.hostnames[i])
        try:
            return run(client, "hostname; getent hosts head; echo $SHELL $FOO", FOO="bar")
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(len(cluster)) as pool:
        answers = list(pool.map(check, range(len(cluster))))
    for host, answer in zip(cluster.hostnames, answers, strict=True):
        name, head, env = answer.splitlines()
        assert name == host
        assert head.split()[0] == cluster.head_ip
        assert env == "/bin/sh bar"  # the node shell, and AcceptEnv passes the environment


def test_nodes_reach_each_other_and_the_head(cluster: Cluster) -> None:
    with socket.create_server((cluster.head_ip, 0)) as server:
        port = server.getsockname()[1]
        probe = (
            "import socket\n"
            "print(socket.create_connection(('node2', 22), 3).recv(7).decode())\n"
            f"s = socket.create_connection(('head', {port}), 3)\n"
            "s.sendall(socket.gethostname().encode())\n"
        )
        client = connect(cluster, "node1")
        try:
            out = run(client, f'{sys.executable} -c "{probe}"')
        finally:
            client.close()
        server.settimeout(5)
        conn, (peer, _) = server.accept()
        with conn:
            assert conn.recv(64) == b"node1"
    assert out.strip() == "SSH-2.0"
    assert peer == cluster.ips[0]


def test_partition_times_out_and_heal_restores(cluster: Cluster) -> None:
    cluster.partition(1)
    with pytest.raises(TimeoutError):
        ssh_banner(cluster.ips[1], timeout=0.5)
    assert ssh_banner(cluster.ips[2]) == b"SSH-2.0-"  # the other nodes are untouched
    cluster.heal(1)
    assert ssh_banner(cluster.ips[1]) == b"SSH-2.0-"


def test_pids_and_kill(cluster: Cluster) -> None:
    client = connect(cluster, "node3")
    try:
        _, out, _ = client.exec_command("sleep 1234")
        deadline = time.monotonic() + 5
        # wait for the sleep itself: a shell that runs it (``sh -c sleep 1234``) may come first
        while not any(p.split(" ", 1)[1] == "sleep 1234" for p in cluster.processes(2)):
            assert time.monotonic() < deadline, cluster.processes(2)
            time.sleep(0.02)
        assert cluster.processes(1) == []  # other nodes see none of it
        sleeper = [p for p in cluster.processes(2) if "sleep 1234" in p]
        killed = cluster.kill(2, "sleep 1234")
        assert sorted(int(p.split()[0]) for p in sleeper) == sorted(killed)
        assert out.channel.recv_exit_status() != 0
    finally:
        client.close()
    assert cluster.wait_no_processes(2, timeout=5) == []
    assert cluster.kill(2, "sshd") == []  # the listener is never a target
    assert ssh_banner(cluster.ips[2]) == b"SSH-2.0-"


def test_stop_and_start_sshd(cluster: Cluster) -> None:
    cluster.stop_sshd(3)
    with pytest.raises(ConnectionRefusedError):
        ssh_banner(cluster.ips[3])
    cluster.start_sshd(3)
    client = connect(cluster, "node4")
    try:
        assert run(client, "hostname").strip() == "node4"
    finally:
        client.close()


def test_a_second_cluster_beside_and_its_teardown(
    cluster: Cluster, cluster_factory: Callable[[int], Cluster]
) -> None:
    other = cluster_factory(2)
    assert other.head_ip != cluster.head_ip
    assert set(other.namespaces).isdisjoint(cluster.namespaces)
    client = connect(other, "node2")
    try:
        assert run(client, "hostname").strip() == "node2"
    finally:
        client.close()
    listener = int((other.state_dir / "nodes" / "node1" / "sshd.pid").read_text())

    other.down()
    other.down()  # idempotent

    assert [ns for ns in other.namespaces if Path("/run/netns", ns).exists()] == []
    assert [d for d in (*other.veths, other.bridge) if Path("/sys/class/net", d).exists()] == []
    assert [ns for ns in other.namespaces if Path("/etc/netns", ns).exists()] == []
    assert not other.state_dir.exists()
    assert not running(listener)
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            cmd = " ".join(p.info["cmdline"] or [])
            if str(other.state_dir) in cmd:
                left.append(cmd)
    assert left == []
    assert ssh_banner(cluster.ips[0]) == b"SSH-2.0-"  # the shared cluster lives on
