"""The gateway's upstream pool keeps its connections, however many descriptors the process holds."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from gateway.proxy import Upstream
from tests.stack import wait_for


def _serve(*, answers_per_connection: int) -> Iterator[tuple[int, list[int]]]:
    """An HTTP service on 127.0.0.1 that hangs up after ``answers_per_connection`` answers
    (without saying so, as a restarted worker drops its idle connections):
    (port, [connections accepted, connections closed])."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = [0, 0]

    def answer(conn: socket.socket) -> None:
        buf = b""
        try:
            for _ in range(answers_per_connection):  # bounded: a test sends a handful
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                _, _, buf = buf.partition(b"\r\n\r\n")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        finally:
            conn.close()
            accepted[1] += 1

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


@pytest.fixture
def service() -> Iterator[tuple[int, list[int]]]:
    """A keep-alive HTTP service."""
    yield from _serve(answers_per_connection=1000)


@pytest.fixture
def hangs_up() -> Iterator[tuple[int, list[int]]]:
    """A service that closes each connection after one answer."""
    yield from _serve(answers_per_connection=1)


def test_pooled_connections_are_reused_past_fd_setsize(service: tuple[int, list[int]]) -> None:
    port, accepted = service
    crowd = [socket.socketpair() for _ in range(600)]  # 1200 descriptors: past select()'s 1024
    try:
        upstream = Upstream(
            "availability", f"http://127.0.0.1:{port}", pool_size=4, connect_s=2.0, read_s=5.0
        )
        for method in ("GET", "POST", "GET", "POST", "POST"):  # a POST polls its connection
            answer = upstream.forward(
                method, "/v1/lots/_ping", {}, b"" if method == "POST" else None
            )
            assert (answer.status, answer.body) == (200, b"ok")
        assert accepted[0] == 1  # one connection, kept and reused
    finally:
        for a, b in crowd:
            a.close()
            b.close()


def test_a_connection_the_service_dropped_costs_nothing(hangs_up: tuple[int, list[int]]) -> None:
    """A GET on it is sent again on a new connection; a POST never goes out on it."""
    port, accepted = hangs_up
    upstream = Upstream(
        "ingestion", f"http://127.0.0.1:{port}", pool_size=4, connect_s=2.0, read_s=5.0
    )
    for n, method in enumerate(("GET", "GET", "POST", "POST", "GET"), start=1):
        # the service has hung up on the pooled connection (as a restarted worker had)
        wait_for(lambda n=n: accepted[1] == n - 1, timeout=5, what="the service hanging up")
        answer = upstream.forward(method, "/v1/lots/_ping", {}, b"" if method == "POST" else None)
        assert (answer.status, answer.body) == (200, b"ok"), method
        assert accepted[0] == n  # each request on a connection of its own
