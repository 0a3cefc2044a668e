"""Agents on other hosts, started over SSH with paramiko.

The user's ssh config decides how a host is reached (HostName, User, Port, IdentityFile,
IdentitiesOnly, known_hosts files, StrictHostKeyChecking, ConnectTimeout, ProxyCommand,
ProxyJump). The remote command holds no secret and no environment value: the boot message
goes through the channel's stdin, which then stays open as the agent's lifeline -- when the
launcher dies, sshd closes it and the agent reaps everything and exits.
"""

from __future__ import annotations

__all__ = [
    "Interpreter",
    "RemoteAgentProcess",
    "RemoteCommand",
    "SSHError",
    "agent_command",
    "open_ssh",
]

import contextlib
import getpass
import logging
import os
import random
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .routes import route_to

if TYPE_CHECKING:
    import paramiko

# paramiko logs each failed handshake with its traceback: the error we raise says it once, and
# the handshakes we retry are no error at all
logging.getLogger("paramiko").addHandler(logging.NullHandler())

_DEFAULT_CONNECT_TIMEOUT_S = 10.0
_FIRST_RETRY_S = 0.1  # then doubled, with jitter, up to _LAST_RETRY_S: a busy sshd recovers fast
_LAST_RETRY_S = 2.0
_NO_DIRECTORY = 97
_NO_PYTHON = 98


class SSHError(RuntimeError):
    """A host cannot be reached or logged into; the message names the host and the reason."""


class SSHConnection:
    """A logged-in SSH client and the addresses of its connection."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        local_address: str,
        remote_address: str,
        via: SSHConnection | None = None,
    ) -> None:
        self.client = client
        self.local_address = local_address  # ours, as the host sees it: its agent reaches us here
        self.remote_address = remote_address  # the host's, as we reach it
        self.via = via  # the ProxyJump host's connection

    def close(self) -> None:
        """Close the connection (and the jump host's, if any)."""
        self.client.close()
        if self.via is not None:
            self.via.close()


def _config_files(ssh_config_file: str | os.PathLike[str] | None) -> list[Path]:
    if ssh_config_file is not None:
        path = Path(ssh_config_file).expanduser()
        if not path.is_file():
            msg = f"ssh_config_file={os.fspath(ssh_config_file)!r} is not a file"
            raise SSHError(msg)
        return [path]
    return [
        p for p in (Path("~/.ssh/config").expanduser(), Path("/etc/ssh/ssh_config")) if p.is_file()
    ]


def _lookup(hostname: str, ssh_config_file: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The host's options, first value wins as in OpenSSH (the user's file before the system's)."""
    import paramiko  # noqa: PLC0415 -- only launchers with remote hosts pay for it

    options: dict[str, Any] = {}
    for path in _config_files(ssh_config_file):
        try:
            found = paramiko.SSHConfig.from_path(str(path)).lookup(hostname)
        except Exception as e:
            msg = f"{hostname}: cannot read the ssh config {path}: {e}"
            raise SSHError(msg) from e
        for key, value in found.items():
            if key not in options or (key == "hostname" and options[key] == hostname):
                options[key] = value
    options.setdefault("hostname", hostname)
    return options


def open_ssh(
    hostname: str, ssh_config_file: str | os.PathLike[str] | None, timeout: float
) -> SSHConnection:
    """Connect and log in to ``hostname`` as its ssh config says; bounded by ``timeout``.

    A handshake that the server drops before it starts (what sshd does past its ``MaxStartups``,
    when many launchers or many hosts behind one bastion connect at once) is tried again, with
    back-off, until ``timeout``: the host's own, or its ProxyJump host's; any other failure is
    final at once.
    """
    deadline = time.monotonic() + timeout
    pause = _FIRST_RETRY_S
    while True:
        dropped = _try_open(hostname, ssh_config_file, deadline - time.monotonic())
        if isinstance(dropped, SSHConnection):
            return dropped
        if deadline - time.monotonic() <= pause:
            raise SSHError(str(dropped)) from dropped.__cause__
        time.sleep(pause * random.uniform(0.5, 1.5))  # jitter: retries of many hosts spread out
        pause = min(2 * pause, _LAST_RETRY_S)


def _try_open(
    hostname: str, ssh_config_file: str | os.PathLike[str] | None, timeout: float
) -> SSHConnection | _DroppedError:
    try:
        return _open_once(hostname, ssh_config_file, timeout)
    except _DroppedError as e:
        return e


class _DroppedError(SSHError):
    """The server closed the connection before the SSH handshake: busy, worth another try."""


def _open_once(
    hostname: str, ssh_config_file: str | os.PathLike[str] | None, timeout: float
) -> SSHConnection:
    import paramiko  # noqa: PLC0415

    options = _lookup(hostname, ssh_config_file)
    target = str(options["hostname"])
    port = int(options.get("port", 22))
    timeout = min(timeout, float(options.get("connecttimeout", _DEFAULT_CONNECT_TIMEOUT_S)))
    client = paramiko.SSHClient()
    _load_known_hosts(client, options)
    strict = str(options.get("stricthostkeychecking", "ask")).lower()
    client.set_missing_host_key_policy(
        paramiko.AutoAddPolicy()
        if strict in ("no", "off", "accept-new")
        else paramiko.RejectPolicy()
    )
    only_listed = str(options.get("identitiesonly", "no")).lower() == "yes"
    keys = [k for k in options.get("identityfile", []) if Path(k).is_file()]
    sock, via = _proxy(hostname, options, ssh_config_file, timeout)
    user = str(options.get("user", getpass.getuser()))
    try:
        client.connect(
            target,
            port=port,
            username=user,
            key_filename=keys or None,
            look_for_keys=not only_listed,
            allow_agent=not only_listed,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=sock,
        )
    except (paramiko.SSHException, OSError, EOFError) as e:
        client.close()
        if via is not None:
            via.close()
        error = _DroppedError if _dropped(e) else SSHError
        raise error(_refusal(hostname, target, port, user, e)) from e
    transport = client.get_transport()
    assert transport is not None  # noqa: S101 -- connect() succeeded
    if isinstance(transport.sock, socket.socket):
        local, remote = str(transport.sock.getsockname()[0]), str(transport.sock.getpeername()[0])
    else:
        local, remote = _proxied_addresses(target, via)
    return SSHConnection(client, local, remote, via)


def _refusal(hostname: str, target: str, port: int, user: str, error: BaseException) -> str:
    """Why connecting to ``hostname`` failed, as the error to raise."""
    import paramiko  # noqa: PLC0415

    if isinstance(error, paramiko.BadHostKeyException):
        return f"{hostname}: its host key does not match known_hosts ({error}): refusing to connect"
    if isinstance(error, paramiko.AuthenticationException):
        return f"{hostname}: authentication as {user} failed ({error})"
    if isinstance(error, paramiko.SSHException):
        if "not found in known_hosts" in str(error):
            return (
                f"{hostname}: host {target} is not in known_hosts (ssh to it once, or add its "
                "key with ssh-keyscan): refusing to connect to an unknown host"
            )
        return f"{hostname}: SSH to {target}:{port} failed: {error}"
    return f"{hostname}: cannot connect to {target}:{port}: {_reason(error)}"


def _dropped(error: BaseException) -> bool:
    """Whether the server hung up before or during its handshake (busy), not refused us.

    paramiko raises its own exception with what happened as its context: a reset or an end of
    stream is a hang-up (through a ProxyJump channel, a drop reads as an end of stream); a
    timeout is not (the host is slow or gone: retrying would only wait).
    """
    hang_ups = (ConnectionResetError, EOFError, BrokenPipeError)
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, hang_ups) or "Connection reset" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(error: BaseException) -> str:
    """Why a connection failed, in words (paramiko wraps the errors of each address it tried)."""
    import paramiko  # noqa: PLC0415

    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError) and error.errors:
        error = next(iter(error.errors.values()))
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (no SSH server listening there?)"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out (host down or unreachable?)"
    return str(error) or type(error).__name__


def _load_known_hosts(client: paramiko.SSHClient, options: dict[str, Any]) -> None:
    files = [Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts")]
    for key in ("userknownhostsfile", "globalknownhostsfile"):
        if key in options:
            files = [Path(f).expanduser() for f in shlex.split(str(options[key]))] + files
    for path in files:
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                client.load_host_keys(str(path))


def _proxy(
    hostname: str,
    options: dict[str, Any],
    ssh_config_file: str | os.PathLike[str] | None,
    timeout: float,
) -> tuple[Any, SSHConnection | None]:
    """A socket-like object for ProxyCommand or ProxyJump (None: direct), and the jump host."""
    import paramiko  # noqa: PLC0415

    command = options.get("proxycommand")
    if command and str(command).lower() != "none":
        return paramiko.ProxyCommand(str(command)), None
    jump = options.get("proxyjump")
    if not jump or str(jump).lower() == "none":
        return None, None
    # one hop, named by its own config block (user@host:port forms are not parsed here)
    jump_host = str(jump).split(",")[0]
    # one try, its drop raised as a drop: open_ssh's loop retries it until its own deadline, as
    # it does the host's (a loop of the jump's own gave up for good at the jump's ConnectTimeout)
    via = _open_once(jump_host, ssh_config_file, timeout)
    transport = via.client.get_transport()
    assert transport is not None  # noqa: S101 -- _open_once() returns a connected client
    try:
        channel = transport.open_channel(
            "direct-tcpip",
            (str(options["hostname"]), int(options.get("port", 22))),
            ("127.0.0.1", 0),
            timeout=timeout,
        )
    except Exception as e:
        via.close()
        msg = f"{hostname}: the jump host {jump_host} cannot reach it: {e}"
        raise SSHError(msg) from e
    return channel, via


def _proxied_addresses(target: str, via: SSHConnection | None) -> tuple[str, str]:
    """Our address and the host's for a proxied connection: best guesses, from routes."""
    local, remote = route_to(target)
    return (via.local_address if via is not None else local), remote


def agent_command(python: str, cwd: str, module: str = "torchrunx.agent") -> str:
    """POSIX sh that runs ``python -m module`` in ``cwd``, or says precisely what is missing."""
    q_python, q_cwd = shlex.quote(python), shlex.quote(cwd)
    return (
        f"cd {q_cwd} 2>/dev/null || exit {_NO_DIRECTORY}; "
        f"command -v {q_python} >/dev/null 2>&1 || exit {_NO_PYTHON}; "
        f"exec {q_python} -m {module}"
    )


@dataclass(frozen=True)
class Interpreter:
    """The Python of a host's agent: the launcher's own, or the user's (``Launcher.python``)."""

    path: str
    chosen: bool = False


def explain_exit(hostname: str, code: int, interpreter: Interpreter, cwd: str) -> str | None:
    """What the exit code of ``agent_command()`` means, for the codes it defines."""
    python = interpreter.path
    if code == _NO_DIRECTORY:
        return (
            f"the launcher's working directory {cwd} does not exist on {hostname}: agents start "
            "in it, so it must be on a filesystem shared by every host, or copied there "
            "(Launcher(sync_dir=True))"
        )
    if code == _NO_PYTHON and interpreter.chosen:
        return f"the Python {python} (Launcher.python) is not on {hostname}"
    if code == _NO_PYTHON:
        return (
            f"the launcher's Python {python} is not on {hostname}: agents run the same "
            "interpreter unless Launcher(python=...) names another, so its environment must be "
            "on a filesystem shared by every host"
        )
    return None


class RemoteCommand:
    """A command in a channel of its own on an open connection: its stdin and stdout as a stream.

    Every read is bounded by ``timeout``; closing it waits (bounded) for the exit status.
    """

    def __init__(self, connection: SSHConnection, command: str, timeout: float) -> None:
        transport = connection.client.get_transport()
        if transport is None or not transport.is_active():
            msg = "the SSH connection is closed"
            raise SSHError(msg)
        self.timeout = timeout
        self.channel = transport.open_session(timeout=timeout)
        self.channel.settimeout(timeout)
        self.channel.exec_command(command)
        self.stdout = self.channel.makefile("rb")

    def write(self, data: bytes) -> None:
        """Send ``data`` whole to the command's stdin."""
        self.channel.sendall(data)

    def readline(self) -> bytes:
        """The next line of its stdout; ``b""`` at its end."""
        return bytes(self.stdout.readline())

    def finish(self) -> tuple[int, str]:
        """Close its stdin; its exit status (-1: none came in time) and what it wrote to stderr."""
        with contextlib.suppress(OSError):
            self.channel.shutdown_write()
        deadline = time.monotonic() + self.timeout
        while not self.channel.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else -1
        err = b""
        with contextlib.suppress(OSError):
            while self.channel.recv_stderr_ready():
                err += self.channel.recv_stderr(65536)
        self.channel.close()
        return status, err.decode(errors="replace").strip()


class _ChannelStdin:
    """The agent's stdin: unbuffered writes to the channel; ``close()`` sends EOF."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel
        self.closed = False

    def write(self, data: bytes) -> None:
        self.channel.sendall(data)

    def flush(self) -> None:
        """Nothing to flush: writes go straight to the channel."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):  # the connection may be gone already
                self.channel.shutdown_write()


class RemoteAgentProcess:
    """An agent behind an SSH channel, with the part of ``subprocess.Popen``'s API we use.

    A thread copies the channel's stderr into a local pipe (``stderr``), which reaches EOF when
    the agent has exited and its exit status is known: the controller watches it like a local
    agent's stderr.
    """

    def __init__(self, connection: SSHConnection, command: str) -> None:
        self.connection = connection
        self.returncode: int | None = None
        self.pid = -1  # the remote pid: known from the agent's hello
        transport = connection.client.get_transport()
        assert transport is not None  # noqa: S101 -- a connected client has one
        self.channel = transport.open_session()
        self.channel.exec_command(command)
        self.stdin = _ChannelStdin(self.channel)
        read_end, self._write_end = os.pipe()
        self.stderr = os.fdopen(read_end, "rb", buffering=0)
        self._exited = threading.Event()
        threading.Thread(target=self._pump, name="torchrunx-ssh-stderr", daemon=True).start()

    def _pump(self) -> None:
        try:
            while True:
                data = self.channel.recv_stderr(65536)
                if not data:
                    break
                os.write(self._write_end, data)
            status = self.channel.recv_exit_status()
            self.returncode = 255 if status < 0 else status  # -1: the connection dropped
        except Exception:  # noqa: BLE001 -- any transport error means the agent is gone to us
            self.returncode = 255
        finally:
            self.connection.close()  # its agent is gone: nothing else uses it
            self._exited.set()
            os.close(self._write_end)

    def poll(self) -> int | None:
        """The exit status once known, else None."""
        return self.returncode if self._exited.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the agent's exit; raises ``subprocess.TimeoutExpired`` like ``Popen``."""
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(["torchrunx agent"], timeout or 0)
        assert self.returncode is not None  # noqa: S101 -- set before the event
        return self.returncode

    def kill(self) -> None:
        """Drop the SSH connection: sshd closes the agent's stdin and it exits."""
        self.connection.close()
