"""HTTP/1.1 at the front door, spoken over raw sockets to the real gateway process (gunicorn
with services.common.leanworker): framing, keep-alive, pipelining, limits and refusals."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.stack import Stack

PING = b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\n\r\n"


def _connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10)


def _read_answer(sock: socket.socket, buf: bytes = b"") -> tuple[int, dict[str, str], bytes, bytes]:
    """(status, headers, body, bytes left over) of one answer with a Content-Length."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:length], rest[length:]


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_serves_many_requests_on_one_connection(stack: Stack) -> None:
    with _connect(stack) as sock:
        for _ in range(20):
            sock.sendall(PING)
            status, headers, body, left = _read_answer(sock)
            assert (status, body, left) == (200, b'{"ok":true}', b"")
            assert headers["connection"] == "keep-alive"
            assert "date" in headers and "x-request-id" in headers


def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    ids = [f"pipe-{n}" for n in range(5)]
    with _connect(stack) as sock:
        sock.sendall(
            b"".join(
                f"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\nX-Request-ID: {i}\r\n\r\n".encode()
                for i in ids
            )
        )
        buf, seen = b"", []
        for _ in ids:
            status, headers, _, buf = _read_answer(sock, buf)
            assert status == 200
            seen.append(headers["x-request-id"])
        assert seen == ids


def test_http_1_0_and_connection_close_end_the_connection(stack: Stack) -> None:
    for request in (
        b"GET /v1/lots/_ping HTTP/1.0\r\n\r\n",
        b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ):
        with _connect(stack) as sock:
            sock.sendall(request)
            status, headers, body, _ = _read_answer(sock)
            assert (status, body, headers["connection"]) == (200, b'{"ok":true}', "close")
            assert _closed(sock)


def test_head_has_the_headers_and_no_body(stack: Stack) -> None:
    with _connect(stack) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + PING)
        buf = b""
        while buf.count(b"\r\n\r\n") < 2:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert rest.startswith(b"HTTP/1.1 200")  # no body between the two answers


def test_a_chunked_body_is_read_whole(stack: Stack, new_operator) -> None:  # type: ignore[no-untyped-def]
    _, operator = new_operator("chunked")
    lot = {
        "name": "Chunked P1",
        "location": {"lat": 30.1, "lon": 120.1},
        "district": "xihu",
        "capacity": {"standard": 5},
        "tariff": {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"},
    }
    body = json.dumps(lot).encode()
    pieces = [body[:10], body[10:25], body[25:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    key = operator.session.headers["Authorization"]
    with _connect(stack) as sock:
        sock.sendall(
            b"POST /v1/lots HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: " + key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        status, _, answer, _ = _read_answer(sock)
    assert status == 201, answer
    assert json.loads(answer)["name"] == "Chunked P1"


def test_expect_100_continue_is_answered_before_the_body(stack: Stack) -> None:
    body = b'{"events": []}'
    with _connect(stack) as sock:
        sock.sendall(
            b"POST /v1/drivers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, headers, _, _ = _read_answer(sock)
    assert status == 422 and headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "header-fields-too-large",
        ),
        (
            b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\n"
            + b"".join(b"X-H%d: v\r\n" % n for n in range(120))
            + b"\r\n",
            431,
            "header-fields-too-large",
        ),
        (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "uri-too-long"),
        (
            b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Content-Length: 4\r\n\r\nabcd",
            400,
            "bad-request",
        ),
        (b"GE\x00T / HTTP/1.1\r\n\r\n", 400, "bad-request"),
        (
            b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "payload-too-large",
        ),
    ],
    ids=["long-header", "many-headers", "long-uri", "two-lengths", "garbage", "huge-body"],
)
def test_protocol_refusals_are_problems_and_close(
    stack: Stack, request_bytes: bytes, status: int, code: str
) -> None:
    with _connect(stack) as sock:
        sock.sendall(request_bytes)
        got, headers, body, _ = _read_answer(sock)
        assert got == status
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["code"] == code
        assert _closed(sock)


def test_a_chunked_body_past_the_bound_is_413(stack: Stack) -> None:
    chunk = b"x" * 65536
    with _connect(stack) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        status = None
        for _ in range(200):  # 12.5 MiB at most, far past the 4 MiB bound
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            status, _, body, _ = _read_answer(sock)
        except ConnectionError:
            pytest.fail("the connection closed without an answer")
    assert status == 413 and json.loads(body)["code"] == "payload-too-large"


def test_underscored_headers_cannot_pose_as_the_signed_principal(stack: Stack) -> None:
    lot = str(uuid.uuid4())
    with _connect(stack) as sock:
        sock.sendall(
            f"GET /v1/reservations/{lot} HTTP/1.1\r\nHost: t\r\n"
            "X_Parking_Principal: driver:someone\r\nX_Parking_Signature: x\r\n\r\n".encode()
        )
        status, _, _, _ = _read_answer(sock)
    assert status == 401


def test_a_head_that_never_ends_is_cut_off_at_the_keepalive(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    slow = Stack(
        database_url,
        redis_url,
        Path(tmp_path_factory.mktemp("keepalive")),
        env_overrides={"GUNICORN_KEEPALIVE": "2"},
        names=("gateway",),
    )
    with slow, _connect(slow) as sock:
        sock.sendall(PING)
        assert _read_answer(sock)[0] in (502, 503)  # served (no services in this stack)
        sock.sendall(b"GET /v1/lots/_ping HTTP/1.1\r\nHost: t\r\n")  # and never ends
        started = time.monotonic()
        assert _closed(sock)
        assert 1.5 <= time.monotonic() - started < 5
        with _connect(slow) as idle:  # a client keeping its connection open does not hold up
            idle.sendall(PING)  # a graceful stop: the idle connection is closed at once
            _read_answer(idle)
            started = time.monotonic()
            slow.stop("gateway")
            assert time.monotonic() - started < 8  # gunicorn's graceful timeout is 20 s
            assert _closed(idle)
