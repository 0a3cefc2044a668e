"""Nobody but the launcher and its own agents and workers can speak on the control plane."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch

import torchrunx

if TYPE_CHECKING:
    from testbed.cluster import Cluster

# A rogue peer: every kind of message it can make up, sent to one ZeroMQ endpoint. The pickle
# frames would create MARKER if anybody unpickled them.
ROGUE = textwrap.dedent("""
    import json, os, pickle, socket, sys, time
    from torchrunx.transport.messages import PROTOCOL_VERSION
    import zmq

    address, marker, run_id, identity = sys.argv[1:5]

    class CreatesFile:
        def __reduce__(self):
            return (open, (marker, "w"))

    evil = pickle.dumps(CreatesFile())
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as raw:
        raw.sendall(os.urandom(4096))  # garbage, not even ZMTP
    ctx = zmq.Context()
    messages = [
        [b"hello", json.dumps({"secret": "0" * 64}).encode()],  # wrong secret
        [b"hello", json.dumps({"version": PROTOCOL_VERSION, "secret": "0" * 64, "facts": {
            "pid": 1, "hostname": "x", "gpus": 0, "cpus": 1, "python": "p", "dir": "d"}}).encode()],
        [b"hello", b"{}"],  # no credentials
        [b"result", json.dumps({"run": run_id, "rank": 0}).encode(), evil],  # no token
        [b"result", json.dumps({"run": run_id, "rank": 0, "token": "x"}).encode(), evil],
        [b"direct", json.dumps({"run": run_id, "rank": 0, "token": "x" * 32}).encode(), evil],
        [b"direct", json.dumps({"run": run_id, "rank": 0}).encode(), evil],  # no token
        [b"error", json.dumps({"run": run_id, "rank": 0}).encode(), evil],
        [b"died", json.dumps({"run": run_id, "rank": 0, "signal": "SIGKILL"}).encode()],
        [b"\\xff", b"not json", evil],
    ]
    answered = 0
    for own_identity in (None, bytes.fromhex(identity)):  # the second: a replay as the agent
        sock = ctx.socket(zmq.DEALER)
        if own_identity:
            sock.setsockopt(zmq.IDENTITY, own_identity)
        sock.connect(address)
        for frames in messages:
            sock.send_multipart(frames)
        answered += sock.poll(300)
        sock.close(linger=0)
    ctx.destroy(linger=0)
    print("answered", answered)
""")


def sleep_then_rank() -> int:
    time.sleep(2)
    return int(os.environ["RANK"])


def attack_during_a_run(
    launcher: torchrunx.Launcher, tmp_path: Path, rogue: list[str], address: str | None = None
) -> Any:
    """Run while ``rogue`` (argv prefix) attacks the launcher's endpoint; return the result."""
    launcher.start()
    pool = launcher._pool
    assert pool is not None
    agent = pool.agents[-1]
    assert agent is not None
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE)
    marker = tmp_path / "unpickled"
    handle = launcher.submit(sleep_then_rank)
    target = address or pool.controller.address
    out = subprocess.run(
        [
            *rogue,
            sys.executable,
            str(script),
            target,
            str(marker),
            handle.run_id,
            agent.identity.hex(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["answered", "0"]
    result = handle.result(timeout=60)
    assert not marker.exists()
    return result


def test_rogue_local_client_is_refused_and_the_run_completes(tmp_path: Path) -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=2, backend="gloo") as lau:
        assert attack_during_a_run(lau, tmp_path, []).by_rank() == [0, 1]
        assert lau.run(sleep_then_rank).by_rank() == [0, 1]  # and the launcher is fine after


def test_rogue_client_on_another_host_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    with torchrunx.Launcher(
        hostnames=cluster.hostnames[:2],
        workers_per_host=1,
        backend="gloo",
        ssh_config_file=cluster.ssh_config,
    ) as lau:
        lau.start()
        assert lau._pool is not None
        address = lau._pool.controller.address_on(cluster.head_ip)  # what the nodes reach
        from_node3 = ["nsenter", f"--net=/run/netns/{cluster.namespaces[2]}"]
        assert attack_during_a_run(lau, tmp_path, from_node3, address).by_rank() == [0, 1]


def test_encrypted_control_plane_runs_and_refuses_plain_clients(tmp_path: Path) -> None:
    def big(n: int) -> torch.Tensor:
        return torch.full((n,), int(os.environ["RANK"]), dtype=torch.int32)

    with torchrunx.Launcher(
        hostnames=["localhost"], workers_per_host=2, backend="gloo", encrypt=True
    ) as lau:
        result = lau.run(big, 1 << 20)  # 4 MiB each: the direct path, encrypted too
        assert [int(t.sum()) for t in result] == [0, 1 << 20]
        assert attack_during_a_run(lau, tmp_path, []).by_rank() == [0, 1]


def test_no_secret_on_a_command_line_or_in_an_environment() -> None:
    with torchrunx.Launcher(hostnames=["localhost"], workers_per_host=1, backend=None) as lau:
        lau.start()
        assert lau._pool is not None
        secret = lau._pool.secret.encode()
        ours = psutil.Process().children(recursive=True)
        assert ours
        for process in ours:
            for part in ("cmdline", "environ"):
                path = Path(f"/proc/{process.pid}/{part}")
                assert secret not in path.read_bytes(), (process.pid, part)
