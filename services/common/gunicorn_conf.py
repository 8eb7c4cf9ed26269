"""gunicorn settings shared by the gateway and the services (``gunicorn -c`` this file).

Each process group gets its own Prometheus multiprocess directory, emptied at start.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from typing import Any

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
timeout = 30
graceful_timeout = 20
max_requests = 0
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "warning")
control_socket_disable = True


def _problem_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own protocol-level refusals (414, 431, bad request lines) as problem+json."""
    import json

    from gunicorn import util

    code = {
        400: "bad-request",
        403: "forbidden",
        413: "payload-too-large",
        414: "uri-too-long",
        431: "header-fields-too-large",
    }.get(status_int, "bad-request")
    body = json.dumps(
        {
            "type": f"https://parking.example/problems/{code}",
            "title": reason,
            "status": status_int,
            "detail": reason.lower(),
            "code": code,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def _install_problem_errors() -> None:
    from gunicorn import util

    util.write_error = _problem_error


def _coalesce_head_and_body() -> None:
    """Send a response's head and a whole, single-piece body in one ``sendall``.

    gunicorn writes the head and then each body piece with a system call apiece; on loopback
    every send runs the receiver's network stack too, so for the small JSON answers that make
    up this platform's traffic one call instead of two is a measurable share of each request.
    Anything else (streams, chunked bodies, HEAD, bodies in pieces) takes gunicorn's own path.
    """
    from gunicorn import util
    from gunicorn.http import wsgi

    plain_write = wsgi.Response.write

    def write(self: Any, arg: bytes) -> None:
        if (
            self.headers_sent
            or self.chunked
            or getattr(self, "_omits_body", False)
            or self.response_length != len(arg)
            or not isinstance(arg, bytes)
        ):
            plain_write(self, arg)
            return
        tosend = self.default_headers()
        tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        head = ("".join(tosend) + "\r\n").encode("latin-1")
        self.headers_sent = True
        self.sent += len(arg)
        util.write(self.sock, head + arg)

    wsgi.Response.write = write


_install_problem_errors()
_coalesce_head_and_body()


def on_starting(server: Any) -> None:
    base = os.environ.get("PARKING_METRICS_DIR") or os.path.join(
        tempfile.gettempdir(), f"parking-metrics-{os.getuid()}"
    )
    path = os.path.join(base, f"{server.proc_name}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def post_worker_init(worker: Any) -> None:
    # The application's objects (modules, schemas, routes: some 80,000 of them) live as long as
    # the worker; kept out of the collector's scans, a full collection no longer walks them all
    # (about 25-50 ms here, a pause for every request in flight when it runs).
    gc.freeze()


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
