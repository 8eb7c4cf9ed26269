"""A small closed-loop HTTP load generator: processes x threads, keep-alive, bounded in time.

Each client sends its next request when the previous answer has arrived. Only 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Request = tuple[str, str, bytes | None, dict[str, str]]  # method, path, body, headers


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Connection:
    """A lean HTTP/1.1 keep-alive client: one socket, the request built as bytes, the answer
    parsed only as far as the status line and ``Content-Length``.

    ``http.client`` parses every answer's headers with the ``email`` package, which costs more
    CPU per request than the servers under test spend on some routes; on a 2-core machine that
    would measure the load generator. Raises ``OSError`` on any connection or framing problem.
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        assert host in ("127.0.0.1", "localhost", "::1"), "load only targets loopback"
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._prefix = f"\r\nHost: {host}:{port}\r\n".encode()

    @classmethod
    def to(cls, base: str, timeout: float = 30.0) -> Connection:
        parts = urlsplit(base)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, timeout)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body)."""
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = [method.encode(), b" ", path.encode(), b" HTTP/1.1", self._prefix]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        if body is not None:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body:
            head.append(body)
        try:
            self._sock.sendall(b"".join(head))
            return self._read_response(method)
        except (OSError, ValueError):
            self.close()
            raise

    def _recv(self) -> bytes:
        assert self._sock is not None
        chunk = self._sock.recv(262144)
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        return chunk

    def _read_response(self, method: str) -> tuple[int, bytes]:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head = buf[:end].lower()
        status = int(head[9:12])
        length = 0
        if method != "HEAD" and status not in (204, 304):
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError("answer without Content-Length")
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
        start = end + 4
        while len(buf) < start + length:
            buf += self._recv()
        self._buf = buf[start + length :]
        if b"\r\nconnection: close" in head:
            self.close()
        return status, buf[start : start + length]


def _client_loop(
    base: str, make: Callable[[int], Request], seconds: float, max_requests: int, out: Result
) -> None:
    conn = Connection.to(base)
    deadline = time.perf_counter() + seconds
    i = 0
    while i < max_requests:
        now = time.perf_counter()
        if now >= deadline:
            break
        method, path, body, headers = make(i)
        i += 1
        try:
            status, _ = conn.request(method, path, body, headers)
        except (OSError, ValueError):
            out.errors += 1
            continue
        out.latencies.append(time.perf_counter() - now)
        out.statuses[status] = out.statuses.get(status, 0) + 1
        out.requests += 1
    conn.close()


def _process(
    base: str,
    make: Callable[[int], Request],
    threads: int,
    seconds: float,
    max_requests: int,
    queue: mp.Queue,  # type: ignore[type-arg]
) -> None:
    results = [Result() for _ in range(threads)]
    workers = [
        threading.Thread(target=_client_loop, args=(base, make, seconds, max_requests, r))
        for r in results
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    merged = Result()
    for r in results:
        merged.requests += r.requests
        merged.errors += r.errors
        merged.latencies += r.latencies
        for k, v in r.statuses.items():
            merged.statuses[k] = merged.statuses.get(k, 0) + v
    queue.put(merged)


def run(
    base: str,
    make: Callable[[int], Request],
    *,
    concurrency: int,
    seconds: float,
    processes: int = 2,
    max_requests_per_client: int = 10_000_000,
) -> Result:
    """Run ``concurrency`` clients (spread over ``processes``) for ``seconds``; merge results."""
    processes = max(1, min(processes, concurrency))
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    per = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    started = time.perf_counter()
    procs = [
        ctx.Process(target=_process, args=(base, make, n, seconds, max_requests_per_client, queue))
        for n in per
    ]
    for p in procs:
        p.start()
    merged = Result()
    for _ in procs:
        r = queue.get(timeout=seconds + 120)
        merged.requests += r.requests
        merged.errors += r.errors
        merged.latencies += r.latencies
        for k, v in r.statuses.items():
            merged.statuses[k] = merged.statuses.get(k, 0) + v
    for p in procs:
        p.join(30)
    merged.seconds = time.perf_counter() - started
    return merged
