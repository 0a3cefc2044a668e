"""Which addresses connect this machine and a host, from the routing table (nothing is sent).

The launcher needs both ends: the host's agent reaches the launcher at ours, and the launcher
names the host's address to the others. ``torchrunx.transport.ssh`` asks it for connections
through a proxy (whose socket says neither), the pool for hosts reached with srun.
"""

from __future__ import annotations

__all__ = ["route_to"]

import socket


def route_to(host: str) -> tuple[str, str]:
    """``(our address towards host, host's address)``, from the routing table (nothing is sent).

    A name this machine cannot resolve is returned as is (other hosts may resolve it), with our
    address from the hostname.
    """
    try:
        remote = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return socket.gethostbyname(socket.gethostname()), host
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((remote, 9))  # a UDP "connect" only picks the route
            return str(s.getsockname()[0]), remote
    except OSError:
        return socket.gethostbyname(socket.gethostname()), remote
