"""``sync_dir``, the launcher's side: a folder of ours, copied to hosts that do not share it.

::

    launcher                                  host: python -m torchrunx.sync_host (an SSH channel)
      sync-offer: every file's path, SHA-256  ─►
                                              ◄─  sync-want: the contents it has nowhere
      each wanted content, in chunks          ─►
                                              ◄─  sync-done: where the copy is

Before a host's agent starts, and again before each run whose folder changed, the launcher
offers the folder as it is now. The host keeps one copy of it per launcher machine and folder,
under ``~/.cache/torchrunx/copies/`` (private to its user); a content it already has anywhere in
that copy is never sent again, and a file that did not change is not rewritten. What the runs
wrote into the copy themselves is left alone: only files of earlier offers are replaced or
removed. Hashes are remembered by (size, mtime, inode), so an unchanged folder costs one walk.

This module owns the folder and its snapshots (``Folder``, ``Snapshot``), sending one
(``push()``, ``copy_over_ssh()``), and what the launcher knows of each host's copy
(``Copies``, ``Placement``). The host's end is ``torchrunx.sync_host``, which also
holds what both ends share (``SyncError``, the frames of a content).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_EXCLUDE",
    "Copies",
    "Folder",
    "Placement",
    "Snapshot",
    "SyncError",
    "copy_over_ssh",
    "push",
]

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from .sync_host import CHUNK, CHUNK_HEAD, END, SyncError
from .transport.messages import (
    PROTOCOL_VERSION,
    Message,
    SyncDone,
    SyncFile,
    SyncOffer,
    SyncWant,
    WireError,
    json_line,
    parse,
    to_json,
)
from .transport.ssh import Interpreter, RemoteCommand, SSHError, agent_command, explain_exit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import pathspec

    from .transport.ssh import SSHConnection

DEFAULT_EXCLUDE = (
    ".git/", ".hg/", ".svn/", "__pycache__/", "*.py[cod]", ".venv/", "venv/", ".tox/", ".nox/",
    ".mypy_cache/", ".ruff_cache/", ".pytest_cache/", "node_modules/", ".ipynb_checkpoints/",
    "*.egg-info/", "torchrunx_logs/",
)  # fmt: skip
"""What never travels (gitignore patterns); a folder with a ``pyvenv.cfg`` or ``conda-meta`` (a
Python environment) neither."""

M = TypeVar("M", bound=Message)

log = logging.getLogger("torchrunx.sync")

LARGE_FOLDER_BYTES = 1 << 30
"""A folder this large (or with ``LARGE_FOLDER_FILES`` files) is named in a warning."""
LARGE_FOLDER_FILES = 20_000
WINDOW = 64
"""Hosts copied to at once."""

_WORTH_IT = 0.9  # compress a content if its first chunk shrinks below this ratio


class Stream(Protocol):
    """Both ways of the channel to the host's ``python -m torchrunx.sync_host``."""

    def write(self, data: bytes) -> None:
        """Send ``data`` whole."""

    def readline(self) -> bytes:
        """The next line (with its newline); ``b""`` at the end."""


@dataclass(frozen=True)
class Snapshot:
    """The folder at one moment: its files, where each content is here, and one digest of all."""

    folder: Folder
    files: tuple[SyncFile, ...]
    sources: dict[str, Path]  # SHA-256 -> a file of ours with that content
    digest: str


class Folder:
    """A folder to copy (``root``), what stays out of it, and the name of its hosts' copies."""

    def __init__(self, root: Path, exclude: Sequence[str] = ()) -> None:
        """``exclude``: more gitignore patterns, relative to ``root``."""
        import pathspec  # noqa: PLC0415 -- only launchers that copy a folder need it

        self.root = root.resolve()
        where = f"{socket.gethostname()}:{self.root}"
        self.name = f"{self.root.name or 'root'}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"
        self.spec: pathspec.GitIgnoreSpec = pathspec.GitIgnoreSpec.from_lines(
            [*DEFAULT_EXCLUDE, *exclude]
        )
        self._hashes: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (stat, sha)
        self._compressible: dict[str, bool] = {}  # sha -> whether compressing it pays
        self._encoded: dict[str, bytes] = {}  # sha -> a small content's frames, made once

    def snapshot(self) -> Snapshot:
        """The folder now; files unchanged since the last snapshot are not read again."""
        files: list[SyncFile] = []
        sources: dict[str, Path] = {}
        for rel, st in sorted(self._walk()):
            path = self.root / rel
            sha = self._hash(path, st)
            files.append(SyncFile(rel, sha, st.st_size, executable=bool(st.st_mode & 0o100)))
            sources.setdefault(sha, path)
        text = json.dumps([to_json(f) for f in files], separators=(",", ":"))
        snapshot = Snapshot(self, tuple(files), sources, hashlib.sha256(text.encode()).hexdigest())
        self.forget_all_but(snapshot)
        return snapshot

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """Files to copy, as (path relative to the root, stat); symlinks to folders not followed."""
        pending = [""]
        while pending:
            rel = pending.pop()
            with os.scandir(self.root / rel) as entries:
                for entry in entries:
                    path = f"{rel}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        if not self.spec.match_file(f"{path}/") and not _is_environment(entry):
                            pending.append(f"{path}/")
                    elif entry.is_file() and not self.spec.match_file(path):
                        with contextlib.suppress(FileNotFoundError):  # gone since the listing
                            yield path, entry.stat()

    def _hash(self, path: Path, st: os.stat_result) -> str:
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._hashes.get(str(path))
        if known is not None and known[0] == key:
            return known[1]
        sha = _sha256(path)
        self._hashes[str(path)] = (key, sha)
        return sha

    def place(self, copy: str, path: str) -> str | None:
        """Where ``path`` (ours) is in a host's ``copy``; None if it is outside the folder."""
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except ValueError:
            return None
        return str(Path(copy, rel)) if rel.parts else copy

    def frames(self, sha: str, source: Path) -> Iterator[bytes]:
        """A content as it travels: chunks, each compressed if that pays, then an empty one.

        A content of one chunk (source files) is encoded once and kept: every host that lacks
        it gets the same bytes.
        """
        kept = self._encoded.get(sha)
        if kept is None:
            with source.open("rb") as f:
                first, chunk = f.read(CHUNK), f.read(CHUNK)
                if chunk:  # a large content: chunk by chunk, never all of it in memory
                    yield self._pack(sha, first)
                    while chunk:
                        yield self._pack(sha, chunk)
                        chunk = f.read(CHUNK)
                    yield END
                    return
            kept = self._encoded[sha] = (self._pack(sha, first) if first else b"") + END
        yield kept

    def _pack(self, sha: str, chunk: bytes) -> bytes:
        """One chunk's frame; whether compressing the content pays is judged by its first."""
        squeeze = self._compressible.get(sha)
        if squeeze is False:
            return _encode(chunk, compressed=False)
        packed = zlib.compress(chunk, 1)
        if squeeze is None:
            squeeze = self._compressible[sha] = len(packed) < _WORTH_IT * len(chunk)
        return _encode(packed, compressed=True) if squeeze else _encode(chunk, compressed=False)

    def forget_all_but(self, snapshot: Snapshot) -> None:
        """Drop what is kept of contents the folder no longer has."""
        for sha in set(self._encoded) - set(snapshot.sources):
            del self._encoded[sha]


def _encode(data: bytes, *, compressed: bool) -> bytes:
    return CHUNK_HEAD.pack(len(data), compressed) + data


def _is_environment(entry: os.DirEntry[str]) -> bool:
    """A virtual environment or conda environment: it belongs to this machine."""
    return os.path.exists(os.path.join(entry.path, "pyvenv.cfg")) or os.path.isdir(  # noqa: PTH110, PTH118, PTH112 -- a DirEntry's path is a str
        os.path.join(entry.path, "conda-meta")  # noqa: PTH118
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def push(snapshot: Snapshot, stream: Stream) -> SyncDone:
    """Bring the host at the other end of ``stream`` to ``snapshot``; what it says when done."""
    stream.write(json_line(SyncOffer(PROTOCOL_VERSION, snapshot.folder.name, snapshot.files)))
    want = _read(stream, SyncWant)
    out = _Batched(stream)
    for sha in want.contents:
        source = snapshot.sources.get(sha)
        if source is None:
            msg = f"the host asked for a content the folder does not have ({sha})"
            raise SyncError(msg)
        for frame in snapshot.folder.frames(sha, source):
            out.write(frame)
    out.flush()
    return _read(stream, SyncDone)


class _Batched:
    """Writes gathered into about ``CHUNK`` bytes each.

    Thousands of small files then cost a few large channel writes, not thousands of small ones.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        if self.size >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.stream.write(b"".join(self.parts))
            self.parts.clear()
            self.size = 0


def copy_over_ssh(
    connection: SSHConnection,
    hostname: str,
    python: Interpreter,
    snapshot: Snapshot,
    timeout: float,
) -> SyncDone:
    """``push()`` to the host's ``python -m torchrunx.sync_host``, in a channel of its own."""
    command = agent_command(python.path, ".", module="torchrunx.sync_host")
    remote = RemoteCommand(connection, command, timeout)
    try:
        done = push(snapshot, remote)
    except (SyncError, WireError, SSHError, OSError, EOFError) as e:
        status, err = remote.finish()
        raise SyncError(_failed(hostname, python, status, err or str(e))) from e
    status, err = remote.finish()
    if status != 0:
        raise SyncError(_failed(hostname, python, status, err))
    return done


def _failed(hostname: str, python: Interpreter, status: int, err: str) -> str:
    """Why copying the folder to ``hostname`` failed, in words."""
    why = explain_exit(hostname, status, python, ".")
    if why is not None:
        return why
    if "No module named" in err and "torchrunx" in err:  # none, or one without the receiver
        return (
            f"{python.path} on {hostname} has no torchrunx, or another release of it: install "
            f"this one there ({err.strip()})"
        )
    return f"copying the folder to {hostname} failed: {err or f'exit status {status}'}"


def _read(stream: Stream, cls: type[M]) -> M:
    line = stream.readline()
    if not line:
        msg = f"the host's end closed before its {cls.KIND}"
        raise SyncError(msg)
    return parse(cls, line)


@dataclass(frozen=True)
class Placement:
    """Where a run's workers on one host start.

    Their working directory, their ``sys.path``, and the copy of the folder they run in with
    the launcher's path of that folder (both "": none).
    """

    cwd: str
    sys_path: tuple[str, ...]
    copy: str = ""
    copied_from: str = ""

    @classmethod
    def here(cls) -> Placement:
        """As the launcher is: on its own host, or one that shares its filesystem."""
        return cls(str(Path.cwd()), tuple(sys.path))


Reach = tuple[str, "SSHConnection", Interpreter]
"""A host as the copying needs it: its name, its agent's SSH connection, its Python."""


class Copies:
    """A folder and each host's copy of it, as the launcher keeps track (hosts by index)."""

    def __init__(self, folder: Folder, hosts: int, timeout: float) -> None:
        """``timeout``: for each read of a host's answer."""
        self.folder = folder
        self.timeout = timeout
        self.paths: list[str | None] = [None] * hosts  # None: it has none (or shares ours)
        self.held = [""] * hosts  # the digest of the snapshot each copy holds
        self.snapshot: Snapshot | None = None  # the latest
        self.lock = threading.Lock()

    def look(self, new_hosts: list[int]) -> None:
        """Before agents start on ``new_hosts``: the folder now.

        Each of those hosts is offered it afresh: a new agent may be a new host under that name.
        """
        self.snapshot = self.folder.snapshot()
        _warn_if_large(self.snapshot)
        for i in new_hosts:
            self.held[i] = ""

    def bring(self, index: int, host: Reach) -> None:
        """Bring host ``index``'s copy to the latest snapshot, if it is not there."""
        snapshot = self.snapshot
        assert snapshot is not None  # noqa: S101 -- taken before agents start or runs sync
        if self.held[index] == snapshot.digest:
            return
        hostname, connection, python = host
        done = copy_over_ssh(connection, hostname, python, snapshot, self.timeout)
        self.paths[index], self.held[index] = done.path, snapshot.digest
        log.info(
            "sync_dir: %s now has %s: %d files written, %d bytes sent",
            hostname,
            done.path,
            done.written,
            done.received,
            extra={"hostname": hostname, "received": done.received, "written": done.written},
        )

    def update(self, indexes: list[int], reach: Callable[[int], Reach]) -> list[tuple[str, str]]:
        """Before a run: the folder's changes reach the copies of ``indexes``, all at once.

        Unchanged, this costs one walk of the folder (sizes and times, no reads). Returns the
        hosts that failed, with why.
        """
        with self.lock:
            self.snapshot = snapshot = self.folder.snapshot()
            stale = [i for i in indexes if self.paths[i] and self.held[i] != snapshot.digest]
            if not stale:
                return []
            hosts = {i: reach(i) for i in stale}
            with concurrent.futures.ThreadPoolExecutor(min(len(stale), WINDOW)) as pool:
                futures = {i: pool.submit(self.bring, i, hosts[i]) for i in stale}
        return [(hosts[i][0], str(f.exception())) for i, f in futures.items() if f.exception()]

    def where(self, index: int) -> Placement:
        """Where host ``index``'s workers start: in its copy, at our place in the folder."""
        copy = self.paths[index]
        if copy is None:
            return Placement.here()
        here = str(Path.cwd())
        mapped = [(self.folder.place(copy, p) or p) if p else p for p in sys.path]
        return Placement(
            cwd=self.folder.place(copy, here) or copy,
            sys_path=tuple(dict.fromkeys([copy, *mapped])),
            copy=copy,
            copied_from=self.folder.root.as_posix(),
        )


def _warn_if_large(snapshot: Snapshot) -> None:
    """A folder this large is more likely a mistake (``sync_dir=True`` in a home folder)."""
    size = sum(f.size for f in snapshot.files)
    if size >= LARGE_FOLDER_BYTES or len(snapshot.files) >= LARGE_FOLDER_FILES:
        log.warning(
            "sync_dir: %s holds %d files, %.1f GiB: each host gets a copy of it (sync_exclude "
            "leaves folders out)",
            snapshot.folder.root,
            len(snapshot.files),
            size / (1 << 30),
        )
