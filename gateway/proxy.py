"""Forwarding to the services over pooled keep-alive connections, with timeouts.

A pool is a stack of sockets per service: taking and returning one is a list pop/append
(atomic under threads and greenlets alike), and a connection idle longer than the services'
keep-alive is dropped rather than reused. Answers are parsed by ``httptools`` (llhttp, the
parser of Node.js): ``http.client`` parses every answer's headers with the ``email`` package,
which cost more than the rest of the forwarding.
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from services.common.errors import Problem
from services.common.sockets import send_all

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
IDLE_S = 50.0  # below gunicorn's keepalive (75 s): never reuse a connection it may close
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
_RECV = 65536
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | None  # None when streaming: read ``chunks``
    chunks: Iterator[bytes] | None = None


class _Answer:
    """One answer read off a connection: the callbacks ``httptools`` calls while parsing."""

    __slots__ = ("body", "complete", "headers", "headers_done", "keep_alive", "parser")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # llhttp resets its keep-alive flag once the message is done: ask it now
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True


class _Closed(ConnectionError):
    """The service closed the connection before a whole answer."""


class Upstream:
    """One service: a keep-alive connection pool and its timeouts."""

    def __init__(
        self, name: str, url: str, *, pool_size: int, connect_s: float, read_s: float
    ) -> None:
        parts = urlsplit(url)
        self.name = name
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.pool_size = pool_size
        self.connect_s = connect_s
        self.read_s = read_s
        self._host_line = f"\r\nHost: {self.host}:{self.port}\r\n".encode()
        self._idle: list[tuple[float, socket.socket]] = []

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_s)
        except OSError as exc:
            raise _unavailable(self.name) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _take(self, *, retryable: bool) -> tuple[socket.socket, bool]:
        """A pooled connection (and True) or a new one. For a request that can be sent again
        (``retryable``) a connection the service closed meanwhile costs only that retry, so it
        is not polled first: that poll was a system call per request on the hottest routes."""
        now = time.monotonic()
        while self._idle:
            try:
                since, sock = self._idle.pop()
            except IndexError:
                break
            if now - since < IDLE_S and (retryable or not _dropped(sock)):
                return sock, True
            sock.close()
        return self._connect(), False

    def _give(self, sock: socket.socket) -> None:
        if len(self._idle) < self.pool_size:
            self._idle.append((time.monotonic(), sock))
        else:
            sock.close()

    def _request_bytes(
        self, method: str, path_qs: str, headers: dict[str, str], body: bytes | None
    ) -> bytes:
        if not path_qs.startswith("/") or _BAD_TARGET.search(path_qs):
            raise Problem(400, "the request target is not valid", code="bad-request")
        try:
            target = path_qs.encode("ascii")
        except UnicodeError:
            raise Problem(400, "the request target is not valid", code="bad-request") from None
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = method.encode("ascii") + b" " + target + b" HTTP/1.1" + self._host_line
        return head + "".join(lines).encode("latin-1") + (body or b"")

    def forward(
        self,
        method: str,
        path_qs: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        streaming: bool = False,
    ) -> UpstreamResponse:
        data = self._request_bytes(method, path_qs, headers, body)
        for attempt in (0, 1):
            sock, reused = self._take(retryable=attempt == 0 and method in IDEMPOTENT)
            sock.settimeout(self.read_s)
            answer = _Answer()
            try:
                send_all(sock, data)
                _read(sock, answer, until_body=streaming or method == "HEAD")
            except TimeoutError as exc:
                sock.close()
                raise Problem(
                    504, f"the {self.name} service did not answer in time", code="upstream-timeout"
                ) from exc
            except (OSError, httptools.HttpParserError) as exc:
                sock.close()
                nothing = not answer.headers_done
                # a reused connection the service closed meanwhile: retry once when safe
                if nothing and reused and attempt == 0 and method in IDEMPOTENT:
                    continue
                if isinstance(exc, ConnectionRefusedError):
                    raise _unavailable(self.name) from exc
                raise Problem(
                    502, f"the {self.name} service failed to answer", code="bad-gateway"
                ) from exc
            parser = answer.parser
            status = parser.get_status_code()
            out = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
            if method == "HEAD":
                sock.close()  # the parser expects a body a HEAD answer never has
                return UpstreamResponse(status, out, b"")
            if not answer.complete:  # streaming
                if _content_type(answer.headers).startswith("text/event-stream"):
                    sock.settimeout(None)
                    return UpstreamResponse(status, out, None, _stream(sock, answer))
                try:
                    _read(sock, answer, until_body=False)
                except TimeoutError as exc:
                    sock.close()
                    raise Problem(
                        504,
                        f"the {self.name} service did not answer in time",
                        code="upstream-timeout",
                    ) from exc
                except (OSError, httptools.HttpParserError) as exc:
                    sock.close()
                    raise Problem(
                        502, f"the {self.name} service failed to answer", code="bad-gateway"
                    ) from exc
            if answer.keep_alive:
                self._give(sock)
            else:
                sock.close()
            return UpstreamResponse(status, out, b"".join(answer.body))
        raise AssertionError("unreachable")


def _read(sock: socket.socket, answer: _Answer, *, until_body: bool) -> None:
    """Feed the parser until the answer is whole (or, ``until_body``, its head is)."""
    while not answer.complete and not (until_body and answer.headers_done):
        chunk = sock.recv(_RECV)
        if not chunk:
            raise _Closed("the service closed the connection")
        answer.parser.feed_data(chunk)


def _content_type(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "content-type":
            return value
    return ""


def _dropped(sock: socket.socket) -> bool:
    """Whether the service closed an idle pooled connection (a restarted or killed worker):
    an idle keep-alive socket that is readable has nothing to say but EOF.

    ``poll``, not ``select``: select() cannot watch a descriptor past FD_SETSIZE (1024), which a
    gateway holding a thousand streams reaches, and every pooled connection then looked dropped
    (each request opened a new one)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _unavailable(name: str) -> Problem:
    return Problem(
        503, f"the {name} service is unavailable", code="unavailable", headers={"Retry-After": "1"}
    )


def _stream(sock: socket.socket, answer: _Answer) -> Iterator[bytes]:
    """The body of a streaming answer, piece by piece as it arrives, until either side ends."""
    try:
        while True:
            if answer.body:
                pieces, answer.body = answer.body, []
                yield b"".join(pieces)
            if answer.complete:
                return
            chunk = sock.recv(_RECV)
            if not chunk:
                return
            answer.parser.feed_data(chunk)
    except (OSError, httptools.HttpParserError):
        return
    finally:
        sock.close()
