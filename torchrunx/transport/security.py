"""Encryption of the control plane (CURVE), for networks that are not trusted.

Authentication is always on and does not depend on this: agents prove themselves with the
launcher's secret, direct results with their run's token. CURVE adds encryption; the launcher's
server key is made fresh for each launcher and reaches agents in their boot message (stdin) and
workers in their run's spec.
"""

from __future__ import annotations

__all__ = ["encrypt_client", "encrypt_server", "new_server_keys"]

import zmq


def new_server_keys() -> tuple[str, str]:
    """A fresh ``(public, secret)`` CURVE key pair, Z85 text."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def encrypt_server(sock: zmq.Socket[bytes], secret_key: str) -> None:
    """Make ``sock`` (before it binds) a CURVE server."""
    sock.curve_server = True
    sock.curve_secretkey = secret_key.encode()


def encrypt_client(sock: zmq.Socket[bytes], server_key: str | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client of ``server_key``; None: no CURVE."""
    if server_key is None:
        return
    public, secret = zmq.curve_keypair()  # the client's own keys are throwaway
    sock.curve_serverkey = server_key.encode()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
