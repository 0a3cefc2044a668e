"""A folder of the launcher's, copied to hosts that do not share its filesystem.

::

    launcher                                     host: python -m torchrunx.sync (an SSH channel)
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
    "receive",
]

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar

from .transport.messages import (
    PROTOCOL_VERSION,
    Message,
    SyncDone,
    SyncFile,
    SyncOffer,
    SyncWant,
    WireError,
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
"""A folder this large (or with :data:`LARGE_FOLDER_FILES` files) is named in a warning."""
LARGE_FOLDER_FILES = 20_000
WINDOW = 64
"""Hosts copied to at once."""

CHUNK = 1 << 20
_CHUNK_HEAD = struct.Struct(">IB")  # length (0: the content's end), compressed
_END = _CHUNK_HEAD.pack(0, 0)
_WORTH_IT = 0.9  # compress a content if its first chunk shrinks below this ratio
_LOCK_WAIT_S = 600.0  # another launcher updating the same copy


class SyncError(RuntimeError):
    """The folder could not be copied; the message says why."""


class Stream(Protocol):
    """Both ways of the channel to the host's ``python -m torchrunx.sync``."""

    def write(self, data: bytes) -> None:
        """Send ``data`` whole."""

    def readline(self) -> bytes:
        """The next line (with its newline); ``b""`` at the end."""


# ---- the launcher's side


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
                    yield _END
                    return
            kept = self._encoded[sha] = (self._pack(sha, first) if first else b"") + _END
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
    return _CHUNK_HEAD.pack(len(data), compressed) + data


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
    stream.write(_line(SyncOffer(PROTOCOL_VERSION, snapshot.folder.name, snapshot.files)))
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
    """Writes gathered into about :data:`CHUNK` bytes each.

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
    """:func:`push` to ``python -m torchrunx.sync`` in a channel of its own on ``connection``."""
    command = agent_command(python.path, ".", "torchrunx.sync")
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
    if "No module named torchrunx" in err:
        return f"{python.path} on {hostname} has no torchrunx: install it there ({err})"
    return f"copying the folder to {hostname} failed: {err or f'exit status {status}'}"


def _line(message: Message) -> bytes:
    return json.dumps(to_json(message), separators=(",", ":")).encode() + b"\n"


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
            "sync_dir: %s holds %d files, %.1f GB: each host gets a copy of it (sync_exclude "
            "leaves folders out)",
            snapshot.folder.root,
            len(snapshot.files),
            size / 1e9,
        )


# ---- the host's side


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/torchrunx`` (default ``~/.cache/torchrunx``), made private to us."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "torchrunx"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # whatever made it: other users may not read what is copied here
    return folder


@dataclass
class _Copy:
    """The host's copy of one folder and its index: what earlier offers put where."""

    path: Path
    index: dict[str, tuple[str, int, int]]  # relative path -> (sha, size, mtime_ns) as written

    @classmethod
    def open(cls, path: Path) -> _Copy:
        try:
            index = json.loads(path.with_name(f"{path.name}.index").read_text())
        except (OSError, ValueError):
            index = {}
        return cls(path, {k: tuple(v) for k, v in index.items()})

    def intact(self, rel: str) -> bool:
        """Whether the file at ``rel`` is still as an offer wrote it (no run changed it)."""
        entry = self.index.get(rel)
        try:
            st = (self.path / rel).stat()
        except OSError:
            return False
        return entry is not None and (st.st_size, st.st_mtime_ns) == (entry[1], entry[2])

    def holds(self, f: SyncFile) -> bool:
        """Whether the copy has ``f`` in place already."""
        return self.intact(f.path) and self.index[f.path][0] == f.sha256

    def save(self) -> None:
        index = self.path.with_name(f"{self.path.name}.index")
        tmp = self.path.with_name(f".{self.path.name}.index")
        tmp.write_text(json.dumps(self.index))
        tmp.replace(index)


def receive(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer one offer on ``stdin``/``stdout``: the host's end of :func:`push`."""
    offer = parse(SyncOffer, stdin.readline())
    files = [_checked_path(f) for f in offer.files]
    copies = cache_folder() / "copies"
    copies.mkdir(mode=0o700, exist_ok=True)
    with _locked(copies / f"{_checked_name(offer.name)}.lock"):
        copy = _Copy.open(copies / offer.name)
        have = {copy.index[r][0]: copy.path / r for r in copy.index if copy.intact(r)}
        stale = [f for f in files if not copy.holds(f)]
        want = sorted({f.sha256 for f in stale} - set(have))
        stdout.write(_line(SyncWant(tuple(want))))
        stdout.flush()
        with tempfile.TemporaryDirectory(dir=copies, prefix=".incoming-") as incoming:
            staged = {sha: _receive_content(stdin, sha, Path(incoming)) for sha in want}
            received = sum(p.stat().st_size for p in staged.values())
            for sha in {f.sha256 for f in stale} - set(staged):  # moved or copied files
                staged[sha] = Path(incoming, sha)
                shutil.copyfile(have[sha], staged[sha])
            _write(copy, stale, staged)
        _remove_gone(copy, {f.path for f in files})
        copy.save()
    stdout.write(_line(SyncDone(str(copy.path), received, len(stale))))
    stdout.flush()


def _checked_path(f: SyncFile) -> SyncFile:
    """A path inside the copy, never beside or above it."""
    parts = f.path.split("/")
    if f.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        msg = f"refusing a path outside the folder: {f.path!r}"
        raise SyncError(msg)
    return f


def _checked_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        msg = f"refusing a copy named {name!r}"
        raise SyncError(msg)
    return name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One offer at a time per copy (two launchers of one folder may sync at once)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"{path} stayed locked for {_LOCK_WAIT_S} s by another launcher"
                    raise SyncError(msg) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _receive_content(stdin: BinaryIO, sha: str, folder: Path) -> Path:
    """One content, from its chunks, into ``folder``; checked against its SHA-256."""
    path = folder / sha
    digest = hashlib.sha256()
    with path.open("wb") as f:
        while True:
            length, compressed = _CHUNK_HEAD.unpack(_exactly(stdin, _CHUNK_HEAD.size))
            if length == 0:
                break
            data = _exactly(stdin, length)
            if compressed:
                data = zlib.decompress(data)
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != sha:
        msg = f"a file changed while it was being copied (expected {sha}): run again"
        raise SyncError(msg)
    return path


def _exactly(stdin: BinaryIO, n: int) -> bytes:
    data = stdin.read(n)
    if len(data) != n:
        msg = f"the launcher's end closed after {len(data)} of {n} bytes"
        raise SyncError(msg)
    return data


def _write(copy: _Copy, stale: list[SyncFile], staged: dict[str, Path]) -> None:
    """Put each stale file in place, atomically (a run never sees half a file)."""
    last = {f.sha256: f.path for f in stale}  # that content's last file may take the staged one
    for f in stale:
        target = copy.path / f.path
        _clear_way(copy.path, target)
        if last[f.sha256] == f.path:
            source = staged[f.sha256]
        else:
            source = target.with_name(f".{target.name}.incoming")
            shutil.copyfile(staged[f.sha256], source)
        source.chmod(0o700 if f.executable else 0o600)
        source.replace(target)
        st = target.stat()
        copy.index[f.path] = (f.sha256, st.st_size, st.st_mtime_ns)


def _clear_way(root: Path, target: Path) -> None:
    """Make ``target``'s folders (private), removing a file or folder that is in the way."""
    root.mkdir(mode=0o700, exist_ok=True)
    for parent in reversed(target.relative_to(root).parents[:-1]):
        folder = root / parent
        if folder.is_file() or folder.is_symlink():
            folder.unlink()
        folder.mkdir(mode=0o700, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)


def _remove_gone(copy: _Copy, offered: set[str]) -> None:
    """Files of earlier offers that the folder no longer has (unless a run changed them)."""
    for rel in [r for r in copy.index if r not in offered]:
        if copy.intact(rel):
            (copy.path / rel).unlink()
        del copy.index[rel]


def main() -> None:
    """``python -m torchrunx.sync``: one offer on stdin, answered on stdout; errors on stderr."""
    os.umask(0o077)
    try:
        receive(sys.stdin.buffer, sys.stdout.buffer)
    except (SyncError, OSError, ValueError) as e:
        print(f"torchrunx.sync: {e}", file=sys.stderr)  # noqa: T201 -- the launcher reads it
        sys.exit(1)


if __name__ == "__main__":
    main()
