"""Socket writes for the lean HTTP paths."""

from __future__ import annotations

import socket


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)`` without gevent's system call per call for the send buffer's size
    (``getsockopt(SO_SNDBUF)``, to size its chunks): one ``send`` carries a whole answer or
    request of these services, and only what it leaves over goes through ``sendall``."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
