"""Several hosts over SSH: real network namespaces, each with its own sshd (testbed/cluster.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.distributed as dist

import torchrunx

if TYPE_CHECKING:
    from testbed.cluster import Cluster


def launcher_on(cluster: Cluster, hosts: list[str], **fields: Any) -> torchrunx.Launcher:
    fields.setdefault("workers_per_host", 1)
    fields.setdefault("backend", "gloo")
    return torchrunx.Launcher(hostnames=hosts, ssh_config_file=cluster.ssh_config, **fields)


def all_reduce_rank() -> dict[str, Any]:
    t = torch.tensor([float(os.environ["RANK"]) + 1])
    dist.all_reduce(t)
    return {
        "host": socket.gethostname(),
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "master": os.environ["MASTER_ADDR"],
        "sum": t.item(),
    }


def test_two_hosts_two_workers_all_reduce(cluster: Cluster) -> None:
    hosts = cluster.hostnames[:2]
    with launcher_on(cluster, hosts, workers_per_host=2) as launcher:
        result = launcher.run(all_reduce_rank)
    assert list(result.by_hostname()) == hosts
    assert [v["rank"] for v in result.by_rank()] == [0, 1, 2, 3]
    for host, values in result.by_hostname().items():
        assert [v["host"] for v in values] == [host, host]
        assert [v["local_rank"] for v in values] == [0, 1]
    assert {v["sum"] for v in result} == {10.0}
    assert {v["master"] for v in result} == {cluster.ips[0]}  # host 0 as the others reach it
    assert result.index(hosts[1], local_rank=1)["rank"] == 3


def test_four_hosts_heterogeneous(cluster: Cluster) -> None:
    counts = [2, 1, 3, 1]
    with launcher_on(cluster, cluster.hostnames, workers_per_host=counts) as launcher:
        result = launcher.run(all_reduce_rank)
    assert [len(v) for v in result.by_hostname().values()] == counts
    assert {v["sum"] for v in result} == {sum(range(1, 8))}
    assert [v["host"] for v in result] == [
        h for h, n in zip(cluster.hostnames, counts, strict=True) for _ in range(n)
    ]


def test_localhost_and_a_remote_host_together(cluster: Cluster) -> None:
    with launcher_on(cluster, ["localhost", cluster.hostnames[0]]) as launcher:
        result = launcher.run(all_reduce_rank)
    assert list(result.by_hostname()) == ["localhost", cluster.hostnames[0]]
    assert result.rank(1)["host"] == cluster.hostnames[0]
    assert result.rank(0)["master"] == cluster.head_ip  # this machine, as the nodes reach it
    assert {v["sum"] for v in result} == {3.0}


def test_sweep_of_20_runs_on_3_hosts_pays_ssh_once(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:3]) as launcher:
        launcher.start()
        assert launcher._pool is not None
        agents = [a.facts.pid for a in launcher._pool.agents if a and a.facts]
        for i in range(20):
            result = launcher.run(lambda i: int(os.environ["RANK"]) * i, i)
            assert result.by_rank() == [0, i, 2 * i]
        assert [a.facts.pid for a in launcher._pool.agents if a and a.facts] == agents


def sleep_then_rank(seconds: float) -> int:
    time.sleep(seconds)
    return int(os.environ["RANK"])


def test_killed_remote_agent_fails_at_once_and_the_next_run_restarts_it(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:2]) as launcher:
        launcher.run(sleep_then_rank, 0)
        threading.Timer(1.0, cluster.kill, (1, "-m torchrunx")).start()
        start = time.monotonic()
        with pytest.raises(torchrunx.AgentFailedError) as info:
            launcher.run(sleep_then_rank, 60)
        assert time.monotonic() - start < 5
        assert info.value.hostname == cluster.hostnames[1]
        assert cluster.hostnames[1] in str(info.value)
        assert launcher.run(sleep_then_rank, 0).by_rank() == [0, 1]


def die_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        print("about to die", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def test_killed_remote_worker_names_its_host(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:2]) as launcher:
        with pytest.raises(torchrunx.WorkerFailedError) as info:
            launcher.run(die_on_rank_1)
        assert info.value.hostname == cluster.hostnames[1]
        assert info.value.signal_name == "SIGKILL"
        assert "about to die" in str(info.value)
        assert launcher.run(sleep_then_rank, 0).by_rank() == [0, 1]


def test_partitioned_host_fails_within_agent_timeout(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:2], agent_timeout=3) as launcher:
        launcher.run(sleep_then_rank, 0)
        threading.Timer(1.0, cluster.partition, (1,)).start()
        start = time.monotonic()
        with pytest.raises(torchrunx.AgentFailedError) as info:
            launcher.run(sleep_then_rank, 60)
        assert time.monotonic() - start < 1 + 3 + 3
        assert info.value.hostname == cluster.hostnames[1]
        assert "agent_timeout" in str(info.value)
    # the cut-off agent notices the launcher's silence and clears its host by itself; only the
    # sshd session stays, waiting for a TCP close that the partition swallows
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any("torchrunx" in p for p in cluster.processes(1)):
        time.sleep(0.1)
    assert [p for p in cluster.processes(1) if "sshd" not in p] == []
    cluster.kill(1, "sshd: ")


def test_sigkill_of_the_launcher_clears_every_host(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, time, torchrunx

        def work():
            open(os.path.join({str(tmp_path)!r}, "up." + os.environ["RANK"]), "w").close()
            time.sleep(300)

        torchrunx.Launcher(hostnames={cluster.hostnames[:3]!r}, workers_per_host=2,
                           ssh_config_file={str(cluster.ssh_config)!r}).run(work)
        """)
    )
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("up.*"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(tmp_path.glob("up.*"))) == 6
        assert all(cluster.pids(i) for i in range(3))
    finally:
        process.kill()
        process.wait()
    assert cluster.wait_no_processes(None, timeout=10) == []


def test_host_without_sshd_is_a_clear_error_and_no_agent_stays(cluster: Cluster) -> None:
    cluster.stop_sshd(2)
    start = time.monotonic()
    with pytest.raises(torchrunx.AgentFailedError) as info:
        launcher_on(cluster, cluster.hostnames[:3]).run(sleep_then_rank, 0)
    assert time.monotonic() - start < 10
    assert info.value.hostname == cluster.hostnames[2]
    assert "refused" in str(info.value)
    assert cluster.wait_no_processes(None, timeout=10) == []


def test_unknown_host_key_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch()
    config = tmp_path / "ssh_config"
    config.write_text(cluster.ssh_config.read_text().replace(str(cluster.known_hosts), str(empty)))
    with pytest.raises(torchrunx.AgentFailedError, match="not in known_hosts"):
        torchrunx.Launcher(hostnames=cluster.hostnames[:1], ssh_config_file=config).run(int)


def test_unreachable_host_fails_within_connect_timeout(cluster: Cluster) -> None:
    cluster.partition(3)
    start = time.monotonic()
    with pytest.raises(torchrunx.AgentFailedError, match="cannot connect") as info:
        launcher_on(cluster, cluster.hostnames[2:]).run(int)
    assert time.monotonic() - start < 5 + 3  # ConnectTimeout 5 in the cluster's ssh config
    assert info.value.hostname == cluster.hostnames[3]


def test_no_secret_on_any_remote_command_line_or_environment(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:2]) as launcher:
        launcher.start()
        assert launcher._pool is not None
        secret = launcher._pool.secret
        seen = []
        for i in range(2):
            for pid in cluster.pids(i):
                for part in ("cmdline", "environ"):
                    with contextlib.suppress(OSError):  # a process that just ended
                        seen.append(Path(f"/proc/{pid}/{part}").read_bytes())
        assert seen
        assert not [s for s in seen if secret.encode() in s]


PRIVATE_MOUNT = """
set -e
mount -t tmpfs none "$PRIVATE"
mkdir "$PRIVATE/dir"
ln -s "$VENV" "$PRIVATE/venv"
cd "$WORKDIR"
exec "$PYTHON" -c "$PROGRAM"
"""


@pytest.mark.parametrize("missing", ["directory", "python"])
def test_working_directory_or_python_missing_on_a_host(
    cluster: Cluster, tmp_path: Path, missing: str
) -> None:
    """The launcher runs in a mount namespace of its own: what it puts there the hosts lack."""
    private = tmp_path / "private"
    private.mkdir()
    program = (
        "import torchrunx\n"
        f"torchrunx.Launcher(hostnames={cluster.hostnames[:1]!r},"
        f" ssh_config_file={str(cluster.ssh_config)!r}).run(int)\n"
    )
    venv = Path(sys.executable).parent.parent
    python = private / "venv" / "bin" / Path(sys.executable).name
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_MOUNT]
    out = subprocess.run(
        command,
        env={
            **os.environ,
            "PRIVATE": str(private),
            "VENV": str(venv),
            "WORKDIR": str(private / "dir" if missing == "directory" else tmp_path),
            "PYTHON": str(python if missing == "python" else sys.executable),
            "PROGRAM": program,
            "PYTHONPATH": str(Path(__file__).parents[1]),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "AgentFailedError" in out.stderr, out.stderr
    if missing == "directory":
        assert f"{private}/dir does not exist on {cluster.hostnames[0]}" in out.stderr
    else:
        assert f"Python {python} is not on {cluster.hostnames[0]}" in out.stderr


def test_proxy_jump_reaches_a_host_only_its_jump_host_can_name(
    cluster: Cluster, tmp_path: Path
) -> None:
    """node2 is reached through node1 by a name that only the nodes resolve."""
    config = tmp_path / "ssh_config"
    jump = f"Host {cluster.hostnames[1]}\n    HostName {cluster.hostnames[1]}\n"
    jump += f"    ProxyJump {cluster.hostnames[0]}\n\n"
    config.write_text(jump + cluster.ssh_config.read_text())
    with torchrunx.Launcher(
        hostnames=cluster.hostnames[:2], backend="gloo", ssh_config_file=config
    ) as launcher:
        result = launcher.run(all_reduce_rank)
    assert [v["host"] for v in result] == cluster.hostnames[:2]
    assert {v["sum"] for v in result} == {3.0}


def test_host_whose_hostname_resolves_to_loopback(cluster: Cluster) -> None:
    """As on many cluster nodes: gloo's default interface would be lo, unreachable to peers."""
    hosts_file = Path("/etc/netns") / cluster.namespaces[1] / "hosts"
    original = hosts_file.read_text()
    name = cluster.hostnames[1]
    lines = [
        f"127.0.0.1 {name}" if line.split()[1:] == [name] else line
        for line in original.splitlines()
    ]
    assert lines != original.splitlines()
    with hosts_file.open("w") as f:  # in place: the nodes see this inode through a bind mount
        f.write("\n".join(lines) + "\n")
    try:
        with launcher_on(cluster, cluster.hostnames[:2], workers_per_host=2) as launcher:
            result = launcher.run(all_reduce_rank)
            looked_up = launcher.run(lambda: socket.gethostbyname(socket.gethostname())).rank(2)
        assert looked_up == "127.0.0.1"
        assert {v["sum"] for v in result} == {10.0}
    finally:
        with hosts_file.open("w") as f:
            f.write(original)


def test_key_the_host_refuses_is_a_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = tmp_path / "id_stranger"
    stranger.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    stranger.chmod(0o600)
    config = tmp_path / "ssh_config"
    config.write_text(cluster.ssh_config.read_text().replace(str(cluster.key), str(stranger)))
    start = time.monotonic()
    with pytest.raises(torchrunx.AgentFailedError, match="authentication as root failed") as info:
        torchrunx.Launcher(hostnames=cluster.hostnames[:2], ssh_config_file=config).run(int)
    assert time.monotonic() - start < 10
    assert info.value.hostname in cluster.hostnames[:2]


def test_cpu_and_auto_worker_counts_are_taken_on_each_host(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:2], workers_per_host="cpu") as launcher:
        counts = [len(v) for v in launcher.run(os.cpu_count).by_hostname().values()]
        assert counts == [len(os.sched_getaffinity(0))] * 2
    with launcher_on(cluster, cluster.hostnames[:2], workers_per_host="auto") as launcher:
        assert launcher.run(os.cpu_count).by_hostname() == {
            h: [os.cpu_count()] for h in cluster.hostnames[:2]
        }


def test_view_runs_on_a_subset_of_the_hosts_with_the_same_agents(cluster: Cluster) -> None:
    with launcher_on(cluster, cluster.hostnames[:3], workers_per_host=2) as launcher:
        launcher.start()
        assert launcher._pool is not None
        agents = [a.facts.pid for a in launcher._pool.agents if a and a.facts]
        one = launcher.view([cluster.hostnames[1]], 1).run(all_reduce_rank)
        assert one.by_hostname() == {
            cluster.hostnames[1]: [
                {
                    "host": cluster.hostnames[1],
                    "rank": 0,
                    "local_rank": 0,
                    "master": cluster.ips[1],
                    "sum": 1.0,
                }
            ]
        }
        two = launcher.view(cluster.hostnames[1:3]).submit(all_reduce_rank)
        everyone = launcher.submit(all_reduce_rank)
        assert {v["sum"] for v in two.result(timeout=60)} == {10.0}
        assert {v["sum"] for v in everyone.result(timeout=60)} == {21.0}
        assert [a.facts.pid for a in launcher._pool.agents if a and a.facts] == agents


TRICKY = "a b 'c' \"d\" $HOME `x` \\ é\nsecond line"


def environment_seen() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("TRX_")}


def test_environment_is_the_same_on_every_host(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRX_COPIED", TRICKY)
    monkeypatch.setenv("TRX_OVERRIDDEN", "from the launcher")
    monkeypatch.setenv("TRX_NOT_COPIED", "no")
    env_file = tmp_path / "env.sh"
    env_file.write_text('TRX_HOST="on $(hostname)"\nTRX_OVERRIDDEN="from the file"\n')
    hosts = ["localhost", *cluster.hostnames[:2]]
    with launcher_on(
        cluster,
        hosts,
        copy_env_vars=(*torchrunx.DEFAULT_ENV_VARS_FOR_COPY, "TRX_COPIED", "TRX_OVERRIDDEN"),
        extra_env_vars={"TRX_EXTRA": TRICKY, "TRX_OVERRIDDEN": "from extra"},
        env_file=env_file,
    ) as launcher:
        seen = launcher.run(environment_seen).by_hostname()
        secret_free = [p for i in range(2) for p in cluster.processes(i) if TRICKY[:5] in p]
    assert secret_free == []  # no value on any command line
    for host, (env,) in seen.items():
        assert env["TRX_COPIED"] == TRICKY
        assert env["TRX_EXTRA"] == TRICKY
        assert env["TRX_OVERRIDDEN"] == "from the file"  # copied, then extra, then the file
        assert "TRX_NOT_COPIED" not in env
        assert env["TRX_HOST"] == f"on {socket.gethostname() if host == 'localhost' else host}"


def test_env_file_failing_on_a_host_names_host_file_and_message(
    cluster: Cluster, tmp_path: Path
) -> None:
    env_file = tmp_path / "env.sh"
    env_file.write_text('[ "$(hostname)" = node2 ] && no_such_command_on_node2\ntrue\n')
    with pytest.raises(torchrunx.AgentFailedError) as info:
        launcher_on(cluster, cluster.hostnames[:2], env_file=env_file).run(int)
    text = str(info.value)
    assert info.value.hostname == cluster.hostnames[1]
    assert cluster.hostnames[1] in text
    assert str(env_file) in text
    assert "no_such_command_on_node2" in text


def warn_then_all_reduce() -> float:
    import warnings

    warnings.warn(f"a warning of rank {os.environ['RANK']}", stacklevel=1)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def test_no_c10d_hostname_noise_but_other_warnings(
    cluster: Cluster, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    hosts = cluster.hostnames[:3]
    with launcher_on(cluster, hosts, live_ranks="all", log_dir=tmp_path) as launcher:
        assert launcher.run(warn_then_all_reduce).by_rank() == [3.0, 3.0, 3.0]
    live = capfd.readouterr().err
    files = "".join(f.read_text() for f in tmp_path.rglob("*.log"))
    for output in (live, files):
        assert "The hostname of the client socket cannot be retrieved" not in output
        for rank in range(3):
            assert f"a warning of rank {rank}" in output
