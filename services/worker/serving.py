"""The one small HTTP server of a worker or a beat: ``/metrics``, ``/healthz`` and ``/readyz``.

Celery's prefork pool runs each task in a child process, so a metric a task sets lives in that
child. As under gunicorn, every process of the group writes its samples to files in the group's
own ``PROMETHEUS_MULTIPROC_DIR`` (made and removed by gunicorn_conf's hooks), and the main
process, which runs no task, serves them merged (``metrics.metrics_response``) from a thread, on
``PARKING_WORKER_METRICS_HOST``:``PARKING_WORKER_METRICS_PORT``. Its ``/readyz`` answers 503
while a dependency does not answer; ``/healthz`` only says the process is alive.

Nothing here imports prometheus_client at module level: ``prepare_metrics_dir`` must run first.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from services.common.config import WorkerSettings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("parking.worker.serving")

_server: WSGIServer | None = None


def prepare_metrics_dir() -> None:
    """Give this process group a multiprocess metrics directory of its own, removed at exit.

    prometheus_client chooses where samples go when it is first imported, so this runs before
    anything imports it. In a process that already did (a test runner importing the tasks), the
    samples stay in memory, as before, and nothing is set up.
    """
    if "prometheus_client" in sys.modules:
        return
    from services.common import gunicorn_conf

    gunicorn_conf.on_starting(SimpleNamespace(proc_name="celery"))
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a pool child that happens to run exit handlers
            gunicorn_conf.on_exit(None)

    atexit.register(remove)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds: no access log."""


def _app(checks: dict[str, Callable[[], None]]) -> Flask:
    from flask import Flask

    from services.common import health, metrics
    from services.common.errors import register_error_handlers

    app = Flask("parking.worker.serving")
    register_error_handlers(app)
    health.init_app(app, checks)
    app.add_url_rule("/metrics", "metrics", metrics.metrics_response)
    return app


def serve(settings: WorkerSettings, checks: dict[str, Callable[[], None]]) -> None:
    """Serve the endpoints from a daemon thread of this process; once, and only given a port."""
    global _server
    if not settings.metrics_port or _server is not None:
        return
    try:
        server = make_server(
            settings.metrics_host,
            settings.metrics_port,
            _app(checks),
            server_class=_Server,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        # probes get no answer, so Kubernetes restarts the pod; locally the worker carries on
        log.error(
            "cannot serve metrics and probes",
            extra={"host": settings.metrics_host, "port": settings.metrics_port, "error": str(exc)},
        )
        return
    _server = server
    threading.Thread(target=server.serve_forever, name="parking-http", daemon=True).start()
    log.info(
        "serving metrics and probes",
        extra={"host": settings.metrics_host, "port": settings.metrics_port},
    )


def after_fork() -> None:
    """In a pool child: close the copy of the listening socket; the main process serves."""
    global _server
    if _server is not None:
        _server.socket.close()
        _server = None


def process_exited() -> None:
    """A pool child stops: drop its samples of live gauges, as gunicorn_conf.child_exit does."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
