"""A small closed-loop HTTP load generator: processes x threads, keep-alive, bounded in time.

Each client sends its next request when the previous answer has arrived. Only 127.0.0.1.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
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


def _client_loop(
    base: str, make: Callable[[int], Request], seconds: float, max_requests: int, out: Result
) -> None:
    parts = urlsplit(base)
    assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "load only targets loopback"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    deadline = time.perf_counter() + seconds
    i = 0
    while i < max_requests:
        now = time.perf_counter()
        if now >= deadline:
            break
        method, path, body, headers = make(i)
        i += 1
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            out.errors += 1
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
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
