"""Hosts on one machine for multi-host tests and benchmarks: network namespaces with an sshd each.

Node ``i`` (0-based) is ``node{i+1}``: its own network namespace with ``eth0`` at
``10.231.K.{11+i}`` on a private bridge (``10.231.K.1``, the "head", in the root namespace), its
own hostname (UTS namespace), ``/etc/hosts`` naming the head and every node, and an OpenSSH server
on port 22 that logs root in with the cluster's key. All nodes share this machine's filesystem.
``K`` is a free cluster slot, so several clusters (and several test sessions) can run side by
side. Needs root and Linux.

Things to know when writing tests (or benchmarks) against it:

* The root namespace (where pytest runs) cannot resolve ``nodeI``: connect through
  :attr:`Cluster.ssh_config` (or :attr:`Cluster.ips`). On the nodes, every name resolves through
  the hosts file, and this machine's hostname is an alias of the head.
* Processes started over ssh are not descendants of pytest: check them with :meth:`Cluster.pids`
  and :meth:`Cluster.wait_no_processes`.
* Nodes have no default route and a loopback-only resolver, so nothing leaves the test network.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testbed.process import all_pids, cmdline, kill_all, ns_id, reap, run_command, start_time

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from typing_extensions import Self

PREFIX = "trx"  # kernel object names: netns trx<K>ns<i>, bridge trx<K>br, host-side veth trx<K>v<i>
NET = "10.231"  # cluster K gets 10.231.K.0/24
SSH_PORT = 22
MAX_NODES = 200
# root's login shell on the nodes: bash would source root's ~/.bashrc on every ssh command
NODE_SHELL = "/bin/sh"
PACKAGES = ("openssh-server", "openssh-client", "iproute2", "nftables")
TOOLS = ("sshd", "ssh", "ssh-keygen", "ip", "nft", "unshare", "nsenter")
FAULT_TABLE = "trxfault"
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
SYS_NET = Path("/sys/class/net")
START_TIMEOUT_S = 15.0
INSTALL_TIMEOUT_S = 300.0  # slurm and its plugins on a fresh machine
# sbin is missing from some users' PATH, yet that is where sshd, ip and nft live
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
NODE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class ClusterError(RuntimeError):
    """Bringing up or driving the cluster failed."""


class ClusterUnavailableError(ClusterError):
    """This machine cannot host a cluster (not root, no network namespaces, no package manager)."""


_installed: dict[tuple[str, ...], dict[str, str] | ClusterError] = {}
_tools_lock = threading.Lock()


def ensure_tools(tools: Sequence[str], packages: Sequence[str], why_root: str) -> dict[str, str]:
    """Paths of ``tools``, installing ``packages`` with apt-get first if any is missing.

    Once per process and tool set; a failure is remembered and raised again.
    :class:`ClusterUnavailableError`: not root, or no apt-get (skip); :class:`ClusterError`: the
    install failed.
    """
    key = tuple(tools)
    with _tools_lock:
        found = _installed.get(key)
        if found is None:
            try:
                found = _find_or_install(tools, packages, why_root)
            except ClusterError as e:
                found = e
            _installed[key] = found
    if isinstance(found, ClusterError):
        raise found
    return found


def ensure_prerequisites() -> dict[str, str]:
    """Return the paths of the tools the cluster needs, installing them with apt-get if missing."""
    return ensure_tools(TOOLS, PACKAGES, "network namespaces, veths and sshd as root")


def _find_or_install(
    tools: Sequence[str], packages: Sequence[str], why_root: str
) -> dict[str, str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        msg = f"needs root: {why_root}"
        raise ClusterUnavailableError(msg)
    missing = [t for t in tools if shutil.which(t, path=SEARCH_PATH) is None]
    if missing:
        apt = shutil.which("apt-get", path=SEARCH_PATH)
        if apt is None:
            msg = f"missing {', '.join(missing)} and no apt-get to install {' '.join(packages)}"
            raise ClusterUnavailableError(msg)
        _apt_install(apt, packages)
    found = {t: shutil.which(t, path=SEARCH_PATH) for t in tools}
    still = [t for t, p in found.items() if p is None]
    if still:
        msg = f"still missing after installing {' '.join(packages)}: {still}"
        raise ClusterError(msg)
    return {t: p for t, p in found.items() if p is not None}


def _apt_install(apt: str, packages: Sequence[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # wait for a concurrent apt (another test session) instead of failing on its lock
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *lock, *packages]
    limit = INSTALL_TIMEOUT_S
    done = run_command(install, timeout=limit, check=False, env=env, error=ClusterError)
    if done.returncode != 0:  # stale package lists on a fresh machine: refresh, retry once
        update = [apt, "update", "-q", *lock]
        run_command(update, timeout=limit, check=False, env=env, error=ClusterError)
        run_command(install, timeout=limit, env=env, error=ClusterError)


# ---- processes of a network namespace ---------------------------------------------------------


def _netns_pids(ns: str) -> list[int]:
    """Live processes whose network namespace is ``ns`` (zombies have none, so they never count)."""
    try:
        st = (NETNS_RUN / ns).stat()
    except OSError:
        return []
    target = (st.st_dev, st.st_ino)
    return sorted(pid for pid in all_pids() if ns_id(pid, "net") == target)


# ---- teardown by slot (used by down() and to reap clusters of crashed sessions) ----------------


def _slot_objects(slot: int) -> tuple[list[str], list[str]]:
    """Namespaces and host-side veths of cluster ``slot`` that exist now."""
    p = f"{PREFIX}{slot}"
    names = [e.name for e in NETNS_RUN.iterdir()] if NETNS_RUN.is_dir() else []
    namespaces = sorted(n for n in names if re.fullmatch(rf"{p}ns\d+", n))
    veths = sorted(e.name for e in SYS_NET.iterdir() if re.fullmatch(rf"{p}v\d+", e.name))
    return namespaces, veths


def _teardown(slot: int, state_dir: Path | None) -> None:
    """Remove everything of cluster ``slot``: processes, netns, veths, /etc/netns, bridge, state."""
    p = f"{PREFIX}{slot}"
    namespaces, veths = _slot_objects(slot)
    deadline = time.monotonic() + 5.0
    while True:
        pids = [pid for ns in namespaces for pid in _netns_pids(ns)]
        if not pids or time.monotonic() > deadline:
            break
        kill_all(pids)
        time.sleep(0.02)
    batch = [f"netns del {ns}" for ns in namespaces] + [f"link del {v}" for v in veths]
    if (SYS_NET / f"{p}br").exists():
        batch.append(f"link del {p}br")  # last: the bridge marks the slot as taken
    if batch:
        ip = shutil.which("ip", path=SEARCH_PATH) or "ip"
        # -force: go on past objects that are gone already
        ip_batch = [ip, "-force", "-batch", "-"]
        script = "\n".join(batch) + "\n"
        run_command(ip_batch, stdin=script, check=False, env=NODE_ENV, error=ClusterError)
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if re.fullmatch(rf"{p}ns\d+", d.name):
                shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty: iproute2 makes it on demand
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)


def reap_stale_clusters() -> list[int]:
    """Tear down clusters whose owning process is gone (a killed test session); return their slots.

    The bridge's alias names the owner (pid and start time); a bridge without one is being set up.
    """
    reaped = []
    for bridge in SYS_NET.glob(f"{PREFIX}*br"):
        m = re.fullmatch(rf"{PREFIX}(\d+)br", bridge.name)
        try:
            alias = (bridge / "ifalias").read_text().strip()
        except OSError:
            continue
        owner = re.match(r"torchrunx-tests pid=(\d+) start=(\d+)(?: state=(.*))?$", alias)
        if m is None or owner is None:
            continue
        pid, start, state = owner.groups()
        if start_time(int(pid)) == start:
            continue
        _teardown(int(m.group(1)), Path(state) if state else None)
        reaped.append(int(m.group(1)))
    return reaped


# ---- the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSetup:
    """What differs from node defaults: see :meth:`Cluster.up`."""

    private: tuple[Path, ...] = ()
    max_startups: str = "128:30:256"


class Cluster:
    """N fake hosts on this machine; see the module docstring. Make one with :meth:`up`.

    Attributes:
        hostnames: ``["node1", ..., "nodeN"]``; index ``i`` of every method is into this list.
        ips: the nodes' addresses, in the same order.
        head_ip: the bridge's address in the root namespace, reachable from every node as ``head``.
        ssh_config: OpenSSH client config with a ``Host`` block per node (root, key, known_hosts).
        known_hosts: the nodes' host keys, by name and by address.
        key: private key (ed25519) that logs in as root on every node.
        hosts_file: the nodes' ``/etc/hosts``.
        state_dir: keys, configs and sshd logs (``nodes/<host>/sshd.log``); removed by :meth:`down`.
        namespaces, veths, bridge: kernel object names (netns, host-side veths, bridge).
        port: every node's sshd port.
        up_seconds: how long :meth:`up` took.
    """

    def __init__(
        self,
        slot: int,
        n: int,
        state_dir: Path,
        tools: dict[str, str],
        setup: NodeSetup | None = None,
    ) -> None:
        p = f"{PREFIX}{slot}"
        self.slot = slot
        self.hostnames = [f"node{i + 1}" for i in range(n)]
        self.ips = [f"{NET}.{slot}.{11 + i}" for i in range(n)]
        self.namespaces = [f"{p}ns{i + 1}" for i in range(n)]
        self.veths = [f"{p}v{i + 1}" for i in range(n)]
        self.bridge = f"{p}br"
        self.head_ip = f"{NET}.{slot}.1"
        self.port = SSH_PORT
        self.state_dir = state_dir
        self.ssh_config = state_dir / "ssh_config"
        self.known_hosts = state_dir / "known_hosts"
        self.key = state_dir / "id_ed25519"
        self.hosts_file = state_dir / "hosts"
        self.up_seconds = 0.0
        self.setup = setup or NodeSetup()
        self._tools = tools
        self._listeners: dict[int, int] = {}  # node index -> sshd listener pid
        self._partitioned: set[int] = set()
        self._down = False

    # ---- life cycle ----

    @classmethod
    def up(
        cls,
        n: int,
        state_dir: Path | None = None,
        private: Sequence[Path] = (),
        max_startups: str = "128:30:256",
    ) -> Self:
        """Start ``n`` nodes and wait until every sshd accepts connections.

        Args:
            n: how many nodes.
            state_dir: where keys, configs and logs go (default: a new temporary folder).
            private: folders that each node sees as its own, empty at the start (a tmpfs in the
                node's mount namespace): the launcher's files there do not exist on the nodes,
                and what one node writes there the others do not see. Each must exist.
            max_startups: the sshds' ``MaxStartups`` (``"1"``: a second handshake at once is
                dropped, as a busy bastion does).

        Raises:
            ClusterUnavailableError: this machine cannot host a cluster (skip, don't fail).
            ClusterError: a node did not come up; the message names it and quotes its sshd log.
        """
        if not 1 <= n <= MAX_NODES:
            msg = f"n must be 1..{MAX_NODES}, not {n}"
            raise ValueError(msg)
        missing = [str(p) for p in private if not Path(p).is_dir()]
        if missing:
            msg = f"private folders must exist (they are mount points on the nodes): {missing}"
            raise ValueError(msg)
        started = time.monotonic()
        tools = ensure_prerequisites()
        reap_stale_clusters()
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="trx-cluster-"))
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
        try:
            slot = _claim_slot(tools["ip"], state_dir)
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        cluster = cls(slot, n, state_dir, tools, NodeSetup(tuple(private), max_startups))
        try:
            cluster._bring_up()
        except BaseException:
            cluster.down()
            raise
        cluster.up_seconds = time.monotonic() - started
        return cluster

    def down(self) -> None:
        """Kill every process on the nodes and remove all the cluster made. Idempotent."""
        if self._down:
            return  # the slot may belong to another cluster by now
        _teardown(self.slot, self.state_dir)
        self._listeners.clear()
        self._partitioned.clear()
        self._down = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __len__(self) -> int:
        return len(self.hostnames)

    def __repr__(self) -> str:
        state = "down" if self._down else f"head {self.head_ip}"
        return f"Cluster({', '.join(self.hostnames)}; {state}; {self.state_dir})"

    def reset(self, wait: float = 0.0) -> list[str]:
        """Heal every node, restart stopped sshds, then kill every other process on the nodes.

        Args:
            wait: seconds to let the processes exit by themselves first.

        Returns:
            What was killed, as in :meth:`wait_no_processes`; empty when the nodes were clean.
        """
        for i in list(self._partitioned):
            self.heal(i)
        for i in range(len(self)):
            if self._listener(i) is None:
                self.start_sshd(i)
        left = self.wait_no_processes(timeout=wait)
        if left:
            for i in range(len(self)):
                kill_all(self.pids(i))
            self.wait_no_processes(timeout=5.0)
        return left

    # ---- processes ----

    def pids(self, i: int) -> list[int]:
        """Live processes in node ``i``'s network namespace, except its sshd listener."""
        listener = self._listeners.get(self._index(i))
        return [pid for pid in _netns_pids(self.namespaces[i]) if pid != listener]

    def processes(self, i: int) -> list[str]:
        """``"pid cmdline"`` of :meth:`pids`, for assertion messages."""
        return [f"{pid} {cmdline(pid)[:200]}" for pid in self.pids(i)]

    def kill(self, i: int, pattern: str) -> list[int]:
        """SIGKILL node ``i``'s processes whose command line contains ``pattern``; return the pids.

        The sshd listener is never killed (use :meth:`stop_sshd`).
        """
        pids = [pid for pid in self.pids(i) if pattern in cmdline(pid)]
        kill_all(pids)
        return pids

    def wait_no_processes(self, i: int | None = None, timeout: float = 10.0) -> list[str]:
        """Wait until only the sshd listener runs on node ``i`` (default: on every node).

        Returns:
            What still runs at the timeout, as ``"nodeI: pid cmdline"``; empty when clean.
        """
        nodes = range(len(self)) if i is None else [self._index(i)]
        deadline = time.monotonic() + timeout
        while True:
            left = [f"{self.hostnames[j]}: {p}" for j in nodes for p in self.processes(j)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    # ---- faults ----

    def partition(self, i: int) -> None:
        """Drop all traffic on node ``i``'s eth0, both ways (loopback keeps working).

        Peers see timeouts, not resets; established connections stall.
        """
        # "add" then "delete" makes the script idempotent; nft applies the file atomically
        hook = "type filter hook {} priority -10; policy accept;"
        rules = (
            f"add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n"
            f"table inet {FAULT_TABLE} {{\n"
            f'  chain input {{ {hook.format("input")} iifname "eth0" drop; }}\n'
            f'  chain output {{ {hook.format("output")} oifname "eth0" drop; }}\n'
            "}\n"
        )
        self._nft(i, rules)
        self._partitioned.add(self._index(i))

    def heal(self, i: int) -> None:
        """Undo :meth:`partition` on node ``i`` (a no-op if it is not partitioned)."""
        self._nft(i, f"add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n")
        self._partitioned.discard(self._index(i))

    def stop_sshd(self, i: int, timeout: float = 5.0) -> None:
        """Stop node ``i``'s sshd listener (open sessions live on); new connections are refused."""
        pid = self._listener(i)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid in _netns_pids(self.namespaces[i]):
            if time.monotonic() > deadline:
                kill_all([pid])
                break
            time.sleep(0.01)
        self._listeners.pop(self._index(i), None)

    def start_sshd(self, i: int) -> None:
        """Start node ``i``'s sshd (a no-op if it runs) and wait until it accepts connections."""
        if self._listener(i) is not None:
            return
        self._start_nodes([self._index(i)], configure_network=False)

    # ---- internals ----

    def _index(self, i: int) -> int:
        if not 0 <= i < len(self):
            msg = f"node index {i} out of range 0..{len(self) - 1}"
            raise IndexError(msg)
        return i

    def _node_dir(self, i: int) -> Path:
        return self.state_dir / "nodes" / self.hostnames[i]

    def _listener(self, i: int) -> int | None:
        """Node ``i``'s sshd listener pid, if it is alive and still in the node's namespace."""
        pid = self._listeners.get(self._index(i))
        if pid is None or pid not in _netns_pids(self.namespaces[i]):
            return None
        return pid

    def _nft(self, i: int, rules: str) -> None:
        # nsenter enters only the network namespace: lighter than `ip netns exec`
        ns = f"--net={NETNS_RUN / self.namespaces[self._index(i)]}"
        nft = [self._tools["nsenter"], ns, self._tools["nft"], "-f", "-"]
        run_command(nft, stdin=rules, env=NODE_ENV, error=ClusterError)

    def _bring_up(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir, made by systemd
        self._write_keys()
        self._write_node_files()
        ip = self._tools["ip"]
        _set_ipv6_off(self.bridge)
        batch = [f"netns add {ns}" for ns in self.namespaces]
        batch += [
            f"link add {v} type veth peer name eth0 netns {ns}"
            for v, ns in zip(self.veths, self.namespaces, strict=True)
        ]
        try:
            run_command(
                [ip, "-batch", "-"], stdin="\n".join(batch) + "\n", env=NODE_ENV, error=ClusterError
            )
        except ClusterError as e:
            if "not permitted" in str(e) or "Permission denied" in str(e):
                msg = f"cannot create network namespaces: {e}"
                raise ClusterUnavailableError(msg) from e
            raise
        for v in self.veths:
            _set_ipv6_off(v)  # bridge ports need no address; spares router/neighbour chatter
        batch = [f"link set {v} master {self.bridge} up" for v in self.veths]
        batch += [f"addr add {self.head_ip}/24 dev {self.bridge}", f"link set {self.bridge} up"]
        run_command(
            [ip, "-batch", "-"], stdin="\n".join(batch) + "\n", env=NODE_ENV, error=ClusterError
        )
        self._start_nodes(range(len(self)), configure_network=True)
        self._write_client_files()
        # the readiness probes leave short-lived preauth sshd children: let them exit
        self.wait_no_processes(timeout=5.0)

    def _write_keys(self) -> None:
        self._write_key(self.key, "cluster-client")
        (self.state_dir / "authorized_keys").write_text(
            self.key.with_suffix(".pub").read_text(), encoding="utf-8"
        )
        for i, host in enumerate(self.hostnames):
            self._node_dir(i).mkdir(parents=True, exist_ok=True)
            self._write_key(self._node_dir(i) / "ssh_host_ed25519_key", host)

    @staticmethod
    def _write_key(path: Path, comment: str) -> None:
        """An ed25519 key pair in OpenSSH format (in-process: no ssh-keygen per node)."""
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # ssh rejects wider modes
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        path.with_suffix(".pub").write_bytes(public + f" {comment}\n".encode())

    def _write_node_files(self) -> None:
        """Per-node /etc files: `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*."""
        head_names = ["head"]
        machine = socket.gethostname()
        if machine not in {"localhost", "head", *self.hostnames}:
            head_names.append(machine)  # the launcher's own name must reach it from the nodes
        hosts = [
            "127.0.0.1 localhost",
            "::1 localhost ip6-localhost ip6-loopback",
            f"{self.head_ip} {' '.join(head_names)}",
        ]
        hosts += [f"{ip} {host}" for ip, host in zip(self.ips, self.hostnames, strict=True)]
        self.hosts_file.write_text("\n".join(hosts) + "\n", encoding="utf-8")
        # a name missing from hosts fails at once instead of asking the machine's resolver
        resolv = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
        passwd = "".join(
            _with_root_shell(line) + "\n" for line in Path("/etc/passwd").read_text().splitlines()
        )
        for ns, host in zip(self.namespaces, self.hostnames, strict=True):
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.hosts_file, etc / "hosts")
            (etc / "resolv.conf").write_text(resolv, encoding="utf-8")
            (etc / "hostname").write_text(host + "\n", encoding="utf-8")
            (etc / "passwd").write_text(passwd, encoding="utf-8")
        for i, (ip, host, ns) in enumerate(
            zip(self.ips, self.hostnames, self.namespaces, strict=True)
        ):
            d = self._node_dir(i)
            (d / "sshd_config").write_text(
                f"""\
# {host} ({ip}, netns {ns})
Port {self.port}
ListenAddress 0.0.0.0
AddressFamily inet
HostKey {d / "ssh_host_ed25519_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {self.state_dir / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
AcceptEnv *
PermitUserEnvironment no
X11Forwarding no
PrintMotd no
PrintLastLog no
MaxStartups {self.setup.max_startups}
MaxSessions 64
Subsystem sftp internal-sftp
LogLevel INFO
""",
                encoding="utf-8",
            )

    def _write_client_files(self) -> None:
        host_keys = []
        blocks = []
        for i, (ip, host) in enumerate(zip(self.ips, self.hostnames, strict=True)):
            pub = (self._node_dir(i) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            names = (
                f"{host},{ip}" if self.port == 22 else f"[{host}]:{self.port},[{ip}]:{self.port}"
            )
            host_keys.append(f"{names} {' '.join(pub)}\n")
            blocks.append(
                f"Host {host}\n"
                f"    HostName {ip}\n"
                f"    Port {self.port}\n"
                "    User root\n"
                f"    IdentityFile {self.key}\n"
                "    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {self.known_hosts}\n"
                "    StrictHostKeyChecking yes\n"
                "    BatchMode yes\n"
                "    ConnectTimeout 5\n"
                "    LogLevel ERROR\n\n"
            )
        self.known_hosts.write_text("".join(host_keys), encoding="utf-8")
        self.ssh_config.write_text("".join(blocks), encoding="utf-8")

    def _start_nodes(self, nodes: Iterable[int], configure_network: bool) -> None:
        """Start the sshd of ``nodes`` (configuring their eth0 first if asked); wait until ready."""
        launched: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for i in nodes:
                launched[i] = self._launch_sshd(i, configure_network)
            self._wait_ready(launched)
        finally:
            for proc in launched.values():
                reap(proc)

    def _launch_sshd(self, i: int, configure_network: bool) -> subprocess.Popen[bytes]:
        d = self._node_dir(i)
        (d / "sshd.pid").unlink(missing_ok=True)
        q = shlex.quote
        # sshd runs in its own UTS namespace so that `hostname` in every session says nodeI
        config, log = q(str(d / "sshd_config")), q(str(d / "sshd.log"))
        sshd = (
            f"echo {q(self.hostnames[i])} > /proc/sys/kernel/hostname && "
            f"exec {q(self._tools['sshd'])} -f {config} -E {log}"
        )
        script = f"exec {q(self._tools['unshare'])} --uts /bin/sh -c {q(sshd)}"
        # `ip netns exec` gave the node a mount namespace of its own (slave to ours): a tmpfs
        # there hides our folder from the node and is the node's alone
        mounts = "".join(
            f"mount -t tmpfs -o mode=0755 trx {q(str(p))}\n" for p in self.setup.private
        )
        script = mounts + script
        if configure_network:
            ipv6 = "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"
            ip = q(self._tools["ip"])
            # no default route on purpose: a node reaches only 127/8 and the cluster's /24
            script = (
                f"if [ -w {ipv6} ]; then echo 1 > {ipv6}; fi\n"
                f"{ip} link set lo up\n"
                f"{ip} addr add {self.ips[i]}/24 dev eth0\n"
                f"{ip} link set eth0 up\n{script}"
            )
        err = (d / "start.err").open("wb")  # a file, not a pipe: the daemon must not hold it open
        with err:
            return subprocess.Popen(
                [self._tools["ip"], "netns", "exec", self.namespaces[i], "/bin/sh", "-ec", script],
                env=NODE_ENV,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )

    def _wait_ready(self, launched: dict[int, subprocess.Popen[bytes]]) -> None:
        """Wait until each launched sshd has written its pid file and answers with an SSH banner."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(launched)
        while pending:
            for i, proc in list(pending.items()):
                rc = proc.poll()
                if rc is not None and rc != 0:
                    raise self._start_failure(i, f"its start command exited with {rc}")
                pid = self._read_pid(i)
                if rc is None or pid is None:
                    continue  # sshd writes its pid file once it listens
                if pid not in _netns_pids(self.namespaces[i]):
                    raise self._start_failure(i, f"sshd (pid {pid}) exited")
                if self._banner(
                    self.ips[i], timeout=max(0.1, min(1.0, deadline - time.monotonic()))
                ):
                    self._listeners[i] = pid
                    del pending[i]
            if not pending:
                return
            if time.monotonic() > deadline:
                i = min(pending)
                raise self._start_failure(i, f"no sshd answered within {START_TIMEOUT_S} s")
            time.sleep(0.01)

    def _read_pid(self, i: int) -> int | None:
        try:
            text = (self._node_dir(i) / "sshd.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _banner(self, ip: str, timeout: float) -> bool:
        try:
            with socket.create_connection((ip, self.port), timeout=timeout) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _start_failure(self, i: int, why: str) -> ClusterError:
        d = self._node_dir(i)
        parts = [f"sshd on {self.hostnames[i]} ({self.ips[i]}:{self.port}) did not come up: {why}"]
        for name in ("start.err", "sshd.log"):
            with contextlib.suppress(OSError):
                text = (d / name).read_text(errors="replace").strip()
                if text:
                    tail = "\n".join(text.splitlines()[-20:])
                    parts.append(f"--- {d / name} (last lines) ---\n{tail}")
        return ClusterError("\n".join(parts))


def _with_root_shell(passwd_line: str) -> str:
    fields = passwd_line.rstrip("\n").split(":")
    if len(fields) == 7 and fields[2] == "0":
        fields[6] = NODE_SHELL
    return ":".join(fields)


def _set_ipv6_off(dev: str) -> None:
    with contextlib.suppress(OSError):  # absent when the kernel has no IPv6
        Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6").write_text("1")


def _claim_slot(ip: str, state_dir: Path) -> int:
    """Take the first free slot by creating its bridge: `ip link add` fails if another took it."""
    alias = f"torchrunx-tests pid={os.getpid()} start={start_time(os.getpid())}"
    if len(f"{alias} state={state_dir}") < 256:  # the kernel caps an alias at 255 bytes
        alias = f"{alias} state={state_dir}"
    for slot in range(256):
        bridge = f"{PREFIX}{slot}br"
        if (SYS_NET / bridge).exists():
            continue
        add = [ip, "link", "add", bridge, "type", "bridge"]
        done = run_command(add, check=False, env=NODE_ENV, error=ClusterError)
        if done.returncode == 0:
            # the kernel ignores an alias given to `link add`; until it is set, reapers skip it
            try:
                alias_it = [ip, "link", "set", bridge, "alias", alias]
                run_command(alias_it, env=NODE_ENV, error=ClusterError)
            except BaseException:
                remove = [ip, "link", "del", bridge]
                run_command(remove, check=False, env=NODE_ENV, error=ClusterError)
                raise
            return slot
        if "File exists" in done.stderr:
            continue
        if "Operation not permitted" in done.stderr:
            msg = f"cannot create a bridge: {done.stderr.strip()}"
            raise ClusterUnavailableError(msg)
        msg = f"{shlex.join(add)} exited with {done.returncode}: {done.stderr.strip()}"
        raise ClusterError(msg)
    msg = f"no free slot: 256 bridges {PREFIX}<K>br exist"
    raise ClusterError(msg)
