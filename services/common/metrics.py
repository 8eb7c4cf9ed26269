"""Prometheus metrics, safe under gunicorn's many worker processes.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (the gunicorn config sets it before any worker starts),
every worker writes its samples to files there and ``/metrics`` merges them.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import REGISTRY

REQUESTS = Histogram(
    "parking_http_request_duration_seconds",
    "HTTP requests by service, route and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ERRORS = Counter("parking_http_errors_total", "5xx answers", ["service", "route"])


def metrics_response() -> Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        from services.common.db import POOL_STATS

        registry.register(POOL_STATS)
        data = generate_latest(registry)
    else:
        data = generate_latest(REGISTRY)
    return Response(data, mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask, service: str) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule else "unmatched"
            REQUESTS.labels(service, request.method, route, str(response.status_code)).observe(
                time.perf_counter() - started
            )
            if response.status_code >= 500:
                ERRORS.labels(service, route).inc()
        return response

    app.add_url_rule("/metrics", "metrics", metrics_response)


def observe_request(service: str, method: str, route: str, status: int, started: float) -> None:
    """The request metrics of one answer given outside Flask (the services' lean WSGI paths)."""
    REQUESTS.labels(service, method, route, str(status)).observe(time.perf_counter() - started)
    if status >= 500:
        ERRORS.labels(service, route).inc()
