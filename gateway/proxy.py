"""Forwarding to the services over pooled keep-alive connections, with timeouts.

A pool is a stack of ``http.client`` connections per service: taking and returning one is a
list pop/append (atomic under threads and greenlets alike), and a connection idle longer than
the services' keep-alive is dropped rather than reused.
"""

from __future__ import annotations

import http.client
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common.errors import Problem

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


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | None  # None when streaming: read ``chunks``
    chunks: Iterator[bytes] | None = None


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
        self._idle: list[tuple[float, http.client.HTTPConnection]] = []

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_s)
        try:
            conn.connect()
        except TimeoutError as exc:
            raise _unavailable(self.name) from exc
        except OSError as exc:
            raise _unavailable(self.name) from exc
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        while self._idle:
            try:
                since, conn = self._idle.pop()
            except IndexError:
                break
            if now - since < IDLE_S and not _dropped(conn):
                return conn, True
            conn.close()
        return self._connect(), False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        if len(self._idle) < self.pool_size:
            self._idle.append((time.monotonic(), conn))
        else:
            conn.close()

    def forward(
        self,
        method: str,
        path_qs: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        streaming: bool = False,
    ) -> UpstreamResponse:
        for attempt in (0, 1):
            conn, reused = self._take()
            assert conn.sock is not None
            conn.sock.settimeout(None if streaming else self.read_s)
            try:
                conn.request(method, path_qs, body=body, headers=headers)
                resp = conn.getresponse()
            except (http.client.InvalidURL, UnicodeError) as exc:
                conn.close()
                raise Problem(400, "the request target is not valid", code="bad-request") from exc
            except TimeoutError as exc:
                conn.close()
                raise Problem(
                    504, f"the {self.name} service did not answer in time", code="upstream-timeout"
                ) from exc
            except (
                ConnectionError,
                http.client.RemoteDisconnected,
                http.client.BadStatusLine,
                OSError,
            ) as exc:
                conn.close()
                # a reused connection the service closed meanwhile: retry once when safe
                if reused and attempt == 0 and method in IDEMPOTENT:
                    continue
                if isinstance(exc, ConnectionRefusedError):
                    raise _unavailable(self.name) from exc
                raise Problem(
                    502, f"the {self.name} service failed to answer", code="bad-gateway"
                ) from exc
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            if streaming and (resp.getheader("Content-Type") or "").startswith("text/event-stream"):
                return UpstreamResponse(resp.status, out, None, _stream(resp, conn))
            try:
                data = resp.read()
            except TimeoutError as exc:
                conn.close()
                raise Problem(
                    504, f"the {self.name} service did not answer in time", code="upstream-timeout"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise Problem(
                    502, f"the {self.name} service failed to answer", code="bad-gateway"
                ) from exc
            if resp.will_close:
                conn.close()
            else:
                self._give(conn)
            return UpstreamResponse(resp.status, out, data)
        raise AssertionError("unreachable")


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the service closed an idle pooled connection (a restarted or killed worker):
    an idle keep-alive socket that is readable has nothing to say but EOF."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _unavailable(name: str) -> Problem:
    return Problem(
        503, f"the {name} service is unavailable", code="unavailable", headers={"Retry-After": "1"}
    )


def _stream(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> Iterator[bytes]:
    try:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                return
            yield chunk
    except (OSError, http.client.HTTPException):
        return
    finally:
        conn.close()
