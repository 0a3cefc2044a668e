"""Messages over a local stream socket (agent <-> forkserver), with file descriptors attached.

On the wire: ``!III`` (kind, header and payload lengths), the kind, the JSON header of a typed
message (``.messages``) and a payload. File descriptors ride with the first bytes
(``SCM_RIGHTS``). Both ends are our own processes on one host, connected by ``socketpair``:
nobody else can speak here.
"""

from __future__ import annotations

__all__ = ["recv_message", "send_message"]

import socket
import struct
from typing import TYPE_CHECKING

from .messages import Message, decode, encode

if TYPE_CHECKING:
    from collections.abc import Sequence

_PREFIX = struct.Struct("!III")
_MAX_FDS = 256


def send_message(
    sock: socket.socket,
    message: Message,
    payload: Sequence[bytes | memoryview] = (),
    fds: Sequence[int] = (),
) -> None:
    """Send one message; ``payload`` buffers are concatenated on the wire."""
    kind, head = (bytes(frame) for frame in encode(message))
    size = sum(memoryview(b).nbytes for b in payload)
    first = _PREFIX.pack(len(kind), len(head), size) + kind + head
    sent = socket.send_fds(sock, [first], list(fds)) if fds else sock.send(first)
    sock.sendall(first[sent:])
    for buffer in payload:
        sock.sendall(buffer)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return data


def recv_message(sock: socket.socket) -> tuple[Message, bytearray, list[int]]:
    """Receive one message: the message, its payload and the file descriptors that came with it.

    Raises ``EOFError`` when the peer has closed the connection.
    """
    prefix, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, _MAX_FDS)
    if not prefix:
        raise EOFError
    if len(prefix) < _PREFIX.size:
        prefix += _recv_exactly(sock, _PREFIX.size - len(prefix))
    kind_len, head_len, size = _PREFIX.unpack(prefix)
    kind = bytes(_recv_exactly(sock, kind_len))
    head = bytes(_recv_exactly(sock, head_len))
    message, _ = decode([kind, head])
    return message, _recv_exactly(sock, size), list(fds)
