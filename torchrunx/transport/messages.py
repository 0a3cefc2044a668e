"""Control-plane messages: ``[kind, header, *buffers]`` multipart frames.

``kind`` is a short ASCII word, ``header`` is JSON of plain data (never a pickle: a header is read
before anything is trusted), and the buffers are opaque bytes -- pickles and their out-of-band
buffers -- that only the launcher and the workers ever unpickle.

launcher -> agent: ``run``, ``rendezvous``, ``cancel``, ``shutdown``, ``heartbeat``
agent -> launcher: ``hello``, ``heartbeat``, ``port``, ``output``, ``result``, ``error``,
``died``, ``cleared``, ``failed``
worker -> agent: ``hello``, ``port``, ``result``, ``error``
agent -> worker: ``rendezvous``, ``ack``
"""

from __future__ import annotations

__all__ = ["PROTOCOL_VERSION", "Header", "decode", "encode"]

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import zmq

    from .serialization import Buffer

PROTOCOL_VERSION = 1

Header = dict[str, Any]


def encode(kind: str, header: Header | None = None, *buffers: Buffer) -> list[Buffer]:
    """Frames of one message."""
    return [kind.encode(), json.dumps(header or {}, separators=(",", ":")).encode(), *buffers]


def decode(frames: Sequence[zmq.Frame | bytes]) -> tuple[str, Header, list[zmq.Frame | bytes]]:
    """Split a message into kind, header and buffers; raises ``ValueError`` if malformed."""
    if len(frames) < 2:
        msg = f"a message has at least 2 frames, got {len(frames)}"
        raise ValueError(msg)
    kind = _as_bytes(frames[0]).decode("ascii")
    header = json.loads(_as_bytes(frames[1]))
    if not isinstance(header, dict):
        msg = f"a message header is a JSON object, got {type(header).__name__}"
        raise TypeError(msg)
    return kind, header, list(frames[2:])


def _as_bytes(frame: zmq.Frame | bytes) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes
