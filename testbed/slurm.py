"""A real SLURM cluster on the fake hosts of cluster.py, for tests that run under SLURM.

On top of a :class:`testbed.cluster.Cluster`: ``munged`` with a key and socket of its own,
``slurmctld`` in the root network namespace (its own UTS namespace, hostname ``head``, reached at
the cluster's bridge address), and one ``slurmd`` per node inside the node's network namespace, with
hostname ``nodeI`` and the node's ``/etc`` files (hosts, resolv.conf, passwd) bind-mounted in a
mount namespace of its own. Jobs are started by slurmd, so they inherit all of that: they run as
root on ``nodeI``, resolve every node and ``head`` (and this machine's hostname) through the node's
hosts file, and see this machine's filesystem, virtual environment included. Needs root and apt-get
(or SLURM and munge installed).

Things to know when writing tests against it:

* Client commands (``salloc``, ``sbatch``, ``srun``, ``scontrol``, ...) need
  :attr:`SlurmCluster.env` (``SLURM_CONF``); :meth:`SlurmCluster.environ` is a whole environment
  with it and without inherited ``SLURM_*`` variables.
* ``salloc`` runs its command here, in the root namespace, which cannot resolve ``nodeI``; the
  nodes reach this machine by its hostname.
* There is no accounting (no ``sacct``): job states come from ``scontrol``, which remembers a job
  for ``MinJobAge`` seconds after it ends.
* Every process of a job lives in its node's slurmd mount namespace: :meth:`SlurmCluster.job_pids`
  finds them (slurmd aside) even after they left the job.
* The daemons detach from the process that starts them (not children of pytest) and carry their
  owner in their environment, so those of a killed test session are reaped by the next one.
* slurmctld listens on its own port (from 16817 + 2 * the cluster's slot on), so it runs beside
  other SLURM clusters of this kind or one on the default port 6817.
* The configuration is written once, by :meth:`SlurmCluster.up` (slurmctld and slurmd read it
  when they start): a test that needs other settings needs a cluster of its own.

Preemption (``up(..., preemption=True)``): partition priority preemption that requeues, as
``PreemptType=preempt/partition_prio``, ``PreemptMode=REQUEUE``, ``JobRequeue=1``, with two
partitions on every node: ``low`` (the default, ``PriorityTier=1``, ``GraceTime`` of
``grace_time`` s) and ``high`` (``PriorityTier=2``, never preempted). What SLURM (22.05) then does:

* A job of ``high`` that needs the nodes of a running ``low`` job preempts it at once: SLURM sends
  SIGTERM and SIGCONT to every process of every step of that job on every node (the batch script
  itself gets nothing: a job without steps of its own hears nothing yet). Nodes have
  :data:`NODE_CPUS` CPUs and jobs share them: a job must ask for ``--exclusive`` nodes for another
  to need them.
* When the grace ends, the steps get SIGTERM again, the batch script gets SIGTERM, and SIGKILL
  follows ``KillWait`` (5) s later; then the job is requeued.
* A requeued job (by preemption, or by ``scontrol requeue``) is ``COMPLETING`` with ``Restarts``
  one higher (:meth:`SlurmCluster.restarts`; its next attempt sees ``SLURM_RESTART_COUNT``), then
  ``PENDING``, and then held (``Reason=BeginTime``) for about two minutes:
  :meth:`SlurmCluster.release` starts it now. Submit with ``--open-mode=append`` to keep every
  attempt's output in one file.
* ``scancel --signal=USR1`` (:meth:`SlurmCluster.scancel`) reaches the processes of the job's
  steps, not its batch script; ``scancel --batch --signal=USR1`` the batch script alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.cluster import NETNS_ETC, NETNS_RUN, NODE_ENV, ClusterError, ensure_tools
from testbed.process import (
    all_pids,
    cmdline,
    comm,
    kill_all,
    ns_id,
    reap,
    run_command,
    start_time,
    stat_fields,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    from typing_extensions import Self

    from testbed.cluster import Cluster

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("salloc", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
TOOLS = (*DAEMONS, *CLIENTS, "unshare", "nsenter", "mount")
HEAD_NAME = "head"
PORT_BASE = 16817  # slurmctld's port; slurmd's (in the nodes' namespaces) is the next one
PORT_TRIES = 64
NODE_CPUS = 2
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
CMD_TIMEOUT_S = 30.0
GRACE_TIME_S = 15  # a preempted job's GraceTime, by default: long enough to stop, short for tests
LOW_PARTITION = "low"  # with preemption: the default partition, whose jobs are preempted
HIGH_PARTITION = "high"  # with preemption: the partition whose jobs preempt them
POLL_S = 0.1
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; munged adds ".lock"
OWNER_VAR = "TORCHRUNX_TESTS_SLURM_OWNER"  # "pid:start" of the process that started a daemon
# inherited variables that would steer the client commands (e.g. pytest itself inside a job)
CLIENT_VAR_PREFIXES = ("SLURM_", "SALLOC_", "SBATCH_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_")
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmError(RuntimeError):
    """Bringing up or driving the SLURM cluster failed."""


class SlurmUnavailableError(SlurmError):
    """This machine cannot run SLURM (not root, packages not installable): skip, don't fail."""


_job_names = itertools.count()


def ensure_slurm() -> dict[str, str]:
    """Return the paths of the SLURM and munge programs, installing them with apt-get if missing.

    Every failure here means "no SLURM on this machine": the tests that need it are skipped.
    """
    try:
        # every plugin used here is in slurm-wlm-basic-plugins, a dependency: no recommends
        return ensure_tools(TOOLS, PACKAGES, "slurmd in the nodes' namespaces, jobs as root")
    except ClusterError as e:
        raise SlurmUnavailableError(str(e)) from e


# ---- processes --------------------------------------------------------------------------------

Proc = tuple[int, str]  # (pid, start time): a process, whatever later reuses its pid


def _proc(pid: int) -> Proc | None:
    start = start_time(pid)
    return None if start is None else (pid, start)


def _alive(proc: Proc) -> bool:
    """Whether ``proc`` runs (a zombie waiting for a lazy init to reap it does not)."""
    pid, start = proc
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == start


def _signal(proc: Proc, sig: int) -> None:
    if _alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc[0], sig)


def _stop(procs: Iterable[Proc], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM ``procs``, then SIGKILL those still running after ``timeout`` s."""
    procs = list(procs)
    for p in procs:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    for p in procs:
        _signal(p, signal.SIGKILL)


def _owner(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for var in environ.split(b"\0"):
        if var.startswith(f"{OWNER_VAR}=".encode()):
            return var.split(b"=", 1)[1].decode(errors="replace")
    return None


def reap_stale_daemons() -> list[int]:
    """SIGKILL the SLURM and munge daemons of test sessions that are gone; return their pids."""
    reaped = []
    for pid in all_pids():
        if comm(pid) not in {*DAEMONS, "slurmscriptd", "slurmstepd"}:
            continue
        owner = _owner(pid)
        if owner is None or ":" not in owner:
            continue  # not started by this module
        opid, ostart = owner.split(":", 1)
        if opid.isdigit() and start_time(int(opid)) != ostart:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reaped.append(pid)
    return reaped


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as slurmctld binds it
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 -- slurmctld listens on every address
        except OSError:
            return False
    return True


def _pick_port(slot: int) -> int:
    first = PORT_BASE + 2 * slot
    for port in range(first, first + 2 * PORT_TRIES, 2):
        if _port_free(port):
            return port
    msg = f"no free port for slurmctld in {first}..{first + 2 * PORT_TRIES}"
    raise SlurmError(msg)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"--- {path} (last lines) ---\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


# ---- the cluster ------------------------------------------------------------------------------


class SlurmCluster:
    """SLURM on the nodes of a :class:`cluster.Cluster`; see the module docstring. Use :meth:`up`.

    Attributes:
        cluster: the fake hosts it runs on.
        nodes: SLURM's node names, the cluster's hostnames (``node1``, ...).
        env: what client commands need on top of the environment (``SLURM_CONF``, ``PATH``).
        conf: the generated slurm.conf.
        state_dir: conf, munge key, logs (``slurmctld.log``, ``spool/slurmd.<node>.log``), job
            state; removed by :meth:`down`.
        port: slurmctld's port on :attr:`cluster.Cluster.head_ip`; slurmd's is ``port + 1``.
        up_seconds: how long :meth:`up` took.
        partitions: the partitions, the default first: ``["debug"]``, or with preemption
            ``[LOW_PARTITION, HIGH_PARTITION]``.
        grace_time: with preemption, the ``GraceTime`` of a preempted job (s); else None.
    """

    def __init__(self, cluster: Cluster, state_dir: Path, tools: dict[str, str], port: int) -> None:
        self.cluster = cluster
        self.nodes = list(cluster.hostnames)
        self.partitions = ["debug"]
        self.grace_time: int | None = None
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"
        self.port = port
        self.up_seconds = 0.0
        self._tools = tools
        self._spool = state_dir / "spool"
        socket_path = state_dir / "munge" / "munge.socket"
        self._socket_dir: Path | None = None
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="trx-munge-"))
            socket_path = self._socket_dir / "munge.socket"
        self._munge_socket = socket_path
        client_dir = str(Path(tools["srun"]).parent)
        path = os.environ.get("PATH", "")
        if client_dir not in path.split(os.pathsep):
            path = os.pathsep.join([client_dir, path])
        self.env = {"SLURM_CONF": str(self.conf), "PATH": path}
        self._munged: Proc | None = None
        self._slurmctld: Proc | None = None
        self._slurmd: dict[str, Proc] = {}
        self._job_mnt_ns: dict[str, tuple[int, int]] = {}  # node -> its slurmd's mount namespace
        self._down = False

    # ---- life cycle ----

    @classmethod
    def up(  # noqa: PLR0913 -- keyword-only settings of the one configuration
        cls,
        cluster: Cluster,
        state_dir: Path,
        cpus: int = NODE_CPUS,
        *,
        preemption: bool = False,
        grace_time: int = GRACE_TIME_S,
        extra: Sequence[str] = (),
    ) -> Self:
        """Start munged, slurmctld and a slurmd per node; wait until every node is idle.

        Args:
            cluster: the nodes; SLURM adds processes to them (slurmd's), nothing else.
            state_dir: made if missing; removed by :meth:`down`.
            cpus: CPUs each node offers to jobs.
            preemption: partitions ``low`` and ``high`` instead of ``debug``, and preemption of
                a ``low`` job by a ``high`` one that needs its nodes (see the module docstring).
            grace_time: with ``preemption``, seconds a preempted job has before it is killed.
            extra: more slurm.conf lines (``Name=value``), after the others.

        Raises:
            SlurmUnavailableError: this machine cannot run SLURM (skip, don't fail).
            SlurmError: a daemon did not come up; the message quotes its log.
        """
        started = time.monotonic()
        tools = ensure_slurm()
        reap_stale_daemons()
        port = _pick_port(cluster.slot)
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
        slurm = cls(cluster, state_dir, tools, port)
        if preemption:
            slurm.partitions = [LOW_PARTITION, HIGH_PARTITION]
            slurm.grace_time = grace_time
        try:
            slurm._bring_up(cpus, extra)
        except BaseException:
            slurm.down()
            raise
        slurm.up_seconds = time.monotonic() - started
        return slurm

    def down(self) -> None:
        """Stop the slurmd's (and what runs in their jobs), slurmctld and munged; remove the state.

        Idempotent.
        """
        if self._down:
            return
        _stop(self._slurmd.values())
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := self.job_pids()) and time.monotonic() < deadline:
            kill_all(left)
            time.sleep(0.02)
        self._job_mnt_ns.clear()  # gone with their processes: the kernel may reuse the ids
        _stop([p for p in (self._slurmctld, self._munged) if p is not None])
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._down = True

    def reset(self, wait: float = 0.0) -> list[str]:
        """Cancel every job, then kill what still runs in jobs on the nodes.

        Args:
            wait: seconds to let the jobs' processes exit by themselves first.

        Returns:
            ``"nodeI: pid cmdline"`` of each process that was killed; empty when none was left.
        """
        done = self.run([self._tools["squeue"], "-h", "-o", "%i"], check=False)
        if jobs := done.stdout.split():
            self.run([self._tools["scancel"], *jobs], check=False)
        deadline = time.monotonic() + wait
        while (left := self.job_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(100):
            if not (pids := self.job_pids()):
                break
            kill_all(pids)
            time.sleep(0.02)
        return left

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        state = "down" if self._down else f"slurmctld {self.cluster.head_ip}:{self.port}"
        return f"SlurmCluster({', '.join(self.nodes)}; {state}; {self.state_dir})"

    def daemons(self) -> dict[str, int]:
        """Pids of the daemons that run now: ``munged``, ``slurmctld``, ``slurmd@nodeI``."""
        named = {"munged": self._munged, "slurmctld": self._slurmctld}
        named |= {f"slurmd@{node}": p for node, p in self._slurmd.items()}
        return {name: p[0] for name, p in named.items() if p is not None and _alive(p)}

    def job_pids(self, node: str | None = None) -> list[int]:
        """Live processes that slurmd started on ``node`` (default: on every node), slurmd aside.

        They are found by mount namespace, so even those that left their job are listed.
        """
        targets = {n: ns for n, ns in self._job_mnt_ns.items() if node is None or n == node}
        daemons = {p[0] for p in self._slurmd.values()}
        found = []
        for pid in all_pids():
            if pid in daemons or ns_id(pid, "mnt") not in targets.values():
                continue
            p = _proc(pid)
            if p is not None and _alive(p):
                found.append(pid)
        return sorted(found)

    def job_processes(self) -> list[str]:
        """``"nodeI: pid cmdline"`` of :meth:`job_pids`, for assertion messages."""
        return [
            f"{node}: {pid} {cmdline(pid)[:200]}"
            for node in self.nodes
            for pid in self.job_pids(node)
        ]

    # ---- client commands ----

    def environ(self) -> dict[str, str]:
        """This process's environment without inherited SLURM variables, plus :attr:`env`."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_VAR_PREFIXES)}
        return base | self.env

    def run(
        self, argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sinfo``, ``scontrol ...``) against this cluster; bounded.

        Raises:
            SlurmError: it ran over ``timeout`` s, or (with ``check``) exited with a failure.
        """
        return run_command(argv, timeout=timeout, check=check, env=self.environ(), error=SlurmError)

    def salloc(
        self, n: int, command: Sequence[str], timeout: float = 60.0, args: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``salloc -N n [args] command``: run ``command`` here inside an allocation of n nodes.

        Returns whatever its exit status; stdout and stderr are captured (salloc's own messages
        are on stderr).

        Raises:
            SlurmError: it ran over ``timeout`` s; salloc, ``command`` and the job are killed.
        """
        name = f"trx-salloc-{os.getpid()}-{next(_job_names)}"
        argv = [self._tools["salloc"], "-N", str(n), f"--job-name={name}", *args, *command]
        try:
            return self.run(argv, timeout=timeout, check=False)
        except SlurmError:
            # salloc and its command are killed by now; the job may outlive them in slurmctld
            self.run([self._tools["scancel"], f"--name={name}"], check=False)
            raise

    def sbatch(
        self, script: Path, n: int, args: Sequence[str] = (), script_args: Sequence[str] = ()
    ) -> str:
        """Submit ``script`` on ``n`` nodes; return the job id.

        ``args`` are sbatch's options, ``script_args`` the script's own. The job's working
        directory is the script's; its output goes to ``slurm-<id>.out`` there unless ``args``
        say otherwise.
        """
        argv = [self._tools["sbatch"], "--parsable", "-N", str(n), *args, str(script)]
        argv += script_args
        done = run_command(
            argv, check=False, env=self.environ(), cwd=script.parent, error=SlurmError
        )
        job_id = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job_id.isdigit():
            msg = (
                f"{shlex.join(argv)} exited with {done.returncode} and no job id: "
                f"stdout {done.stdout.strip()!r}, stderr {done.stderr.strip()!r}"
            )
            raise SlurmError(msg)
        return job_id

    def job_info(self, job_id: str) -> dict[str, str]:
        """The job's fields as ``scontrol show job`` has them (``JobState``, ``Reason``, ...).

        Values are single words: a value with spaces (a job name, say) is cut at the first.
        """
        done = self.run([self._tools["scontrol"], "-o", "show", "job", job_id])
        fields = dict(re.findall(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", done.stdout))
        if "JobState" not in fields:
            msg = f"no JobState for job {job_id} in: {done.stdout.strip()}"
            raise SlurmError(msg)
        return fields

    def job_state(self, job_id: str) -> str:
        """The job's state as slurmctld has it (``PENDING``, ``RUNNING``, ``COMPLETED``, ...)."""
        return self.job_info(job_id)["JobState"]

    def restarts(self, job_id: str) -> int:
        """How many times the job was requeued (its next attempt's ``SLURM_RESTART_COUNT``)."""
        return int(self.job_info(job_id)["Restarts"])

    def wait_job(
        self,
        job_id: str,
        timeout: float = 60.0,
        until: Collection[str] = TERMINAL_STATES,
        restarts: int = 0,
        reason: str | None = None,
    ) -> str:
        """Poll the job until its state is one of ``until`` (default: it ended); return the state.

        With ``restarts``, also until it was requeued that many times; with ``reason``, until
        its ``Reason`` is that. ``until={"PENDING"}, restarts=1, reason="BeginTime"`` waits for
        the job to be requeued and held (:meth:`release` it then); ``restarts=1`` alone for its
        second attempt to end.

        Raises:
            SlurmError: not there within ``timeout`` s (the message has the last state).
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state, restarted = info["JobState"], int(info.get("Restarts", "0"))
            if (
                state in until
                and restarted >= restarts
                and (reason is None or info.get("Reason") == reason)
            ):
                return state
            if time.monotonic() > deadline:
                msg = (
                    f"job {job_id} still {state} (reason {info.get('Reason')}, restarts "
                    f"{restarted}) after {timeout} s (waiting for {set(until)}, restarts "
                    f"{restarts}, reason {reason})"
                )
                raise SlurmError(msg)
            time.sleep(POLL_S)

    def release(self, job_id: str) -> None:
        """Start a requeued job now rather than when its hold ends (``StartTime=now``).

        Only once it is held (``Reason=BeginTime``): a job that is still being requeued gets
        its hold after this.
        """
        self.run([self._tools["scontrol"], "update", f"JobId={job_id}", "StartTime=now"])

    def scancel(self, job_id: str, args: Sequence[str] = ()) -> None:
        """Cancel the job (``args`` e.g. ``["--signal=USR1"]``); does not wait for it to end."""
        self.run([self._tools["scancel"], *args, job_id])

    # ---- bring-up ----

    def _bring_up(self, cpus: int, extra: Sequence[str]) -> None:
        (self.state_dir / "ctld").mkdir(exist_ok=True)
        for node in self.nodes:
            (self._spool / node).mkdir(parents=True, exist_ok=True)
        self._munge_socket.parent.mkdir(mode=0o700, exist_ok=True)
        self._write_conf(cpus, extra)
        self._start_munged()
        self._start_slurmctld()
        self._start_slurmds()
        self._wait_idle()

    def _write_conf(self, cpus: int, extra: Sequence[str]) -> None:
        cl = self.cluster
        nodes = "".join(
            f"NodeName={host} NodeAddr={ip} CPUs={cpus} Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN\n"
            for host, ip in zip(cl.hostnames, cl.ips, strict=True)
        )
        if self.grace_time is None:
            partitions = "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        else:
            every = "Nodes=ALL MaxTime=INFINITE State=UP"
            partitions = (
                "PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE\nJobRequeue=1\n"
                f"PartitionName={LOW_PARTITION} {every} Default=YES PriorityTier=1 "
                f"GraceTime={self.grace_time}\n"
                f"PartitionName={HIGH_PARTITION} {every} PriorityTier=2 PreemptMode=OFF\n"
            )
        more = "".join(f"{line}\n" for line in extra)
        s = self.state_dir
        # no cgroups (plain process tracking, no task binding), no accounting; jobs stay known
        # for MinJobAge s after they end
        self.conf.write_text(
            f"""\
ClusterName=trx{cl.slot}
SlurmctldHost={HEAD_NAME}({cl.head_ip})
SlurmctldPort={self.port}
SlurmdPort={self.port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self._munge_socket}
StateSaveLocation={s / "ctld"}
SlurmdSpoolDir={self._spool}/%n
SlurmctldPidFile={s / "slurmctld.pid"}
SlurmdPidFile={self._spool}/slurmd.%n.pid
SlurmctldLogFile={s / "slurmctld.log"}
SlurmdLogFile={self._spool}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
{nodes}{partitions}{more}""",
            encoding="utf-8",
        )

    def _daemon_env(self) -> dict[str, str]:
        return {**NODE_ENV, OWNER_VAR: f"{os.getpid()}:{start_time(os.getpid())}"}

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        """Start a daemon's launch command; it exits once the daemon has detached."""
        err = (self.state_dir / f"{name}.start.err").open("wb")  # not a pipe: daemons keep it
        with err:
            return subprocess.Popen(
                argv, env=self._daemon_env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )

    def _wait_started(
        self, launched: dict[str, subprocess.Popen[bytes]], pidfile: dict[str, Path], program: str
    ) -> dict[str, Proc]:
        """Wait until each launch command exited and its daemon wrote a pid file and runs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        found: dict[str, Proc] = {}
        try:
            while pending := [name for name in launched if name not in found]:
                for name in pending:
                    rc = launched[name].poll()
                    if rc not in {None, 0}:
                        raise self._failure(name, f"its launch command exited with {rc}")
                    p = self._read_pid(pidfile[name])
                    if rc == 0 and p is not None and comm(p[0]) == program:
                        found[name] = p
                if time.monotonic() > deadline:
                    raise self._failure(pending[0], f"not running after {START_TIMEOUT_S} s")
                time.sleep(0.01)
        finally:
            for proc in launched.values():
                reap(proc)
        return found

    @staticmethod
    def _read_pid(path: Path) -> Proc | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        return _proc(int(text)) if text.isdigit() else None

    def _start_munged(self) -> None:
        key = self.state_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # munged wants 0600
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        d = self._munge_socket.parent
        argv = [
            self._tools["munged"],
            "--force",  # the socket's directory is not /run/munge
            f"--key-file={key}",
            f"--socket={self._munge_socket}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={self.state_dir / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]
        started = self._wait_started(
            {"munged": self._spawn(argv, "munged")}, {"munged": d / "munged.pid"}, "munged"
        )
        self._munged = started["munged"]

    def _start_slurmctld(self) -> None:
        q = shlex.quote
        # own UTS namespace: slurmctld runs only where the hostname is SlurmctldHost's
        script = (
            f"echo {HEAD_NAME} > /proc/sys/kernel/hostname && "
            f"exec {q(self._tools['slurmctld'])} -i -f {q(str(self.conf))}"  # -i: no old state
        )
        argv = [self._tools["unshare"], "--uts", "/bin/sh", "-ec", script]
        pidfile = {"slurmctld": self.state_dir / "slurmctld.pid"}
        started = self._wait_started(
            {"slurmctld": self._spawn(argv, "slurmctld")}, pidfile, "slurmctld"
        )
        self._slurmctld = started["slurmctld"]

    def _start_slurmds(self) -> None:
        """One slurmd per node: its netns, its own hostname, the node's /etc files.

        Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd fails
        without it ("No filesystem mounted on /sys/fs/cgroup"). nsenter joins the network
        namespace only; the node's /etc/netns files are bind-mounted by hand, in a mount namespace
        of slurmd's own.
        """
        q = shlex.quote
        launched, pidfile = {}, {}
        for host, ns in zip(self.nodes, self.cluster.namespaces, strict=True):
            etc = sorted((NETNS_ETC / ns).iterdir()) if (NETNS_ETC / ns).is_dir() else []
            binds = "".join(
                f"{q(self._tools['mount'])} --bind {q(str(f))} {q(f'/etc/{f.name}')} && "
                for f in etc
                if Path("/etc", f.name).exists()
            )
            script = (
                f"{binds}echo {q(host)} > /proc/sys/kernel/hostname && "
                f"exec {q(self._tools['slurmd'])} -f {q(str(self.conf))}"
            )
            argv = [
                self._tools["nsenter"],
                f"--net={NETNS_RUN / ns}",
                self._tools["unshare"],
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-ec",
                script,
            ]
            launched[host] = self._spawn(argv, f"slurmd.{host}")
            pidfile[host] = self._spool / f"slurmd.{host}.pid"
        self._slurmd = self._wait_started(launched, pidfile, "slurmd")
        for host, (pid, _) in self._slurmd.items():
            mnt = ns_id(pid, "mnt")
            if mnt is None:
                raise self._failure(host, f"slurmd (pid {pid}) exited")
            self._job_mnt_ns[host] = mnt

    def _wait_idle(self) -> None:
        """Wait until sinfo lists every node idle, resuming nodes that registered down."""
        deadline = time.monotonic() + START_TIMEOUT_S
        sinfo = [self._tools["sinfo"], "-h", "-N", "-o", "%N %t"]
        states: dict[str, str] = {}
        while True:
            for name, p in [("slurmctld", self._slurmctld), *self._slurmd.items()]:
                if p is not None and not _alive(p):
                    raise self._failure(name, f"it exited (pid {p[0]})")
            done = self.run(sinfo, check=False)
            states = dict(line.split(None, 1) for line in done.stdout.splitlines() if " " in line)
            if set(states) == set(self.nodes) and set(states.values()) == {"idle"}:
                return
            if any(s.startswith(("down", "drain")) for s in states.values()):
                resume = [self._tools["scontrol"], "update", "nodename=ALL", "state=resume"]
                self.run(resume, check=False)
            if time.monotonic() > deadline:
                raise self._failure("slurmctld", f"nodes not idle in {START_TIMEOUT_S} s: {states}")
            time.sleep(POLL_S)

    def _failure(self, name: str, why: str) -> SlurmError:
        logs = {
            "munged": [self.state_dir / "munged.log"],
            "slurmctld": [self.state_dir / "slurmctld.log"],
        }.get(name, [self._spool / f"slurmd.{name}.log"])
        logs.insert(
            0, self.state_dir / f"{name if name in DAEMONS else f'slurmd.{name}'}.start.err"
        )
        parts = [f"{name} did not come up: {why}", *filter(None, map(_tail, logs))]
        return SlurmError("\n".join(parts))
