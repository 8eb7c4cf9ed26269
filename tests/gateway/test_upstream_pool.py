"""The gateway's upstream pool keeps its connections, however many descriptors the process holds."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from gateway.proxy import Upstream


@pytest.fixture
def service() -> Iterator[tuple[int, list[int]]]:
    """A keep-alive HTTP service on 127.0.0.1: (port, [connections accepted])."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = [0]

    def answer(conn: socket.socket) -> None:
        with conn:
            buf = b""
            for _ in range(1000):  # bounded: a test sends a handful of requests
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                _, _, buf = buf.partition(b"\r\n\r\n")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve() -> None:
        for _ in range(100):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted[0] += 1
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], accepted
    listener.close()


def test_pooled_connections_are_reused_past_fd_setsize(service: tuple[int, list[int]]) -> None:
    port, accepted = service
    crowd = [socket.socketpair() for _ in range(600)]  # 1200 descriptors: past select()'s 1024
    try:
        upstream = Upstream(
            "availability", f"http://127.0.0.1:{port}", pool_size=4, connect_s=2.0, read_s=5.0
        )
        for _ in range(5):
            answer = upstream.forward("GET", "/v1/lots/_ping", {}, None)
            assert (answer.status, answer.body) == (200, b"ok")
        assert accepted[0] == 1  # one connection, kept and reused
    finally:
        for a, b in crowd:
            a.close()
            b.close()
