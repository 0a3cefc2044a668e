"""``sync_dir``, the host's side: its copies of launchers' folders, and the receiver of offers.

::

    launcher (torchrunx.sync)                   host: python -m torchrunx.sync_host (SSH channel)
      sync-offer: every file's path, SHA-256  ─►  compared with its copy's index
                                              ◄─  sync-want: the contents it has nowhere
      each wanted content, in chunks          ─►  staged, checked (SHA-256), put in place
                                              ◄─  sync-done: where the copy is

The host keeps one copy per launcher machine and folder under ``~/.cache/torchrunx/copies/``
(private to its user), each with an index of what earlier offers wrote (``<copy>.index``): what
the runs wrote into the copy themselves is left alone, and a file is replaced atomically. One
offer at a time per copy (a lock file beside it). This module also owns what both ends share:
``SyncError`` and the frames a content travels in (``CHUNK_HEAD``). It imports none of
the launcher's side: a host receiving a copy loads this, the messages, and the standard library.
"""

from __future__ import annotations

__all__ = ["CHUNK", "CHUNK_HEAD", "END", "SyncError", "cache_folder", "main", "receive"]

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .transport.messages import SyncDone, SyncFile, SyncOffer, SyncWant, json_line, parse

if TYPE_CHECKING:
    from collections.abc import Iterator

CHUNK = 1 << 20
"""The most bytes of a content in one frame."""
CHUNK_HEAD = struct.Struct(">IB")
"""Each frame's head: its length (0: the content's end), and whether it is compressed (zlib)."""
END = CHUNK_HEAD.pack(0, 0)
"""The frame that ends a content."""
_LOCK_WAIT_S = 600.0  # another launcher updating the same copy


class SyncError(RuntimeError):
    """The folder could not be copied; the message says why."""


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
    """Answer one offer on ``stdin``/``stdout``: the host's end of ``push()``."""
    offer = parse(SyncOffer, stdin.readline())
    files = [_checked_path(f) for f in offer.files]
    copies = cache_folder() / "copies"
    copies.mkdir(mode=0o700, exist_ok=True)
    with _locked(copies / f"{_checked_name(offer.name)}.lock"):
        copy = _Copy.open(copies / offer.name)
        have = {copy.index[r][0]: copy.path / r for r in copy.index if copy.intact(r)}
        stale = [f for f in files if not copy.holds(f)]
        want = sorted({f.sha256 for f in stale} - set(have))
        stdout.write(json_line(SyncWant(tuple(want))))
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
    stdout.write(json_line(SyncDone(str(copy.path), received, len(stale))))
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
            length, compressed = CHUNK_HEAD.unpack(_exactly(stdin, CHUNK_HEAD.size))
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
        _drop_bytecode(target)
        st = target.stat()
        copy.index[f.path] = (f.sha256, st.st_size, st.st_mtime_ns)


def _drop_bytecode(source: Path) -> None:
    """Forget the cached bytecode of a module that was just rewritten.

    CPython trusts a ``.pyc`` whose recorded mtime (whole seconds) and size match the source's:
    an edit that keeps the size, written within the second of the last compile, would run the
    old code.
    """
    if source.suffix == ".py":
        for cached in source.parent.glob(f"__pycache__/{source.stem}.*.pyc"):
            cached.unlink(missing_ok=True)


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
            _drop_bytecode(copy.path / rel)
            _remove_emptied(copy.path, (copy.path / rel).parent)
        del copy.index[rel]


def _remove_emptied(root: Path, folder: Path) -> None:
    """Remove ``folder`` and the folders above it (up to ``root``) that hold nothing any more.

    A folder that a run wrote into is not empty, and stays.
    """
    while folder != root and folder.is_relative_to(root):
        pycache = folder / "__pycache__"
        if pycache.is_dir() and not any(pycache.iterdir()):
            pycache.rmdir()
        try:
            folder.rmdir()  # only if empty
        except OSError:
            return
        folder = folder.parent


def main() -> None:
    """``python -m torchrunx.sync_host``: one offer on stdin, answered on stdout; errors: stderr."""
    os.umask(0o077)
    try:
        receive(sys.stdin.buffer, sys.stdout.buffer)
    except (SyncError, OSError, ValueError) as e:
        print(f"torchrunx.sync_host: {e}", file=sys.stderr)  # noqa: T201 -- the launcher reads it
        sys.exit(1)


if __name__ == "__main__":
    main()
