"""The worker and beat answer /healthz while they run, and /readyz only while their servers do.

Each test has a database and a Redis of its own (``isolated``), so it can take them away.
"""

from __future__ import annotations

from pathlib import Path

import requests

from services.common.redis import connect
from tests.stack import Stack, drop_database, free_port, wait_for


def _get(base: str, path: str) -> requests.Response:
    return requests.get(base + path, timeout=5)


def _not_ready(base: str, server: str) -> bool:
    resp = _get(base, "/readyz")
    return (
        resp.status_code == 503
        and resp.headers["Content-Type"] == "application/problem+json"
        and server in resp.json()["detail"]
    )


def _started(stack: Stack, name: str, base: str) -> None:
    stack.start(name)
    wait_for(
        lambda: _get(base, "/readyz").status_code == 200,
        timeout=60,
        interval=0.2,
        what=f"the {name}'s /readyz",
    )


def _serving(name: str, isolated: tuple[str, str], tmp_path: Path) -> tuple[Stack, str]:
    """A stack of just the worker or beat, serving its endpoints on a port of its own."""
    port = free_port()
    stack = Stack(
        isolated[0],
        isolated[1],
        tmp_path / "stack",
        env_overrides={"PARKING_WORKER_METRICS_PORT": str(port)},
        names=(name,),
    )
    return stack, f"http://127.0.0.1:{port}"


def test_worker_is_ready_while_postgresql_and_the_broker_answer(
    isolated: tuple[str, str], servers: tuple[str, str], tmp_path: Path
) -> None:
    database_url, redis_url = isolated
    stack, base = _serving("worker", isolated, tmp_path)
    try:
        _started(stack, "worker", base)
        assert _get(base, "/readyz").json() == {
            "status": "ready",
            "checks": ["broker", "postgresql"],
        }
        assert _get(base, "/healthz").json() == {"status": "ok"}
        assert _get(base, "/nothing-here").status_code == 404

        drop_database(servers[0], database_url)
        wait_for(lambda: _not_ready(base, "postgresql"), timeout=30, what="503 without PostgreSQL")
        assert _get(base, "/healthz").status_code == 200

        connect(redis_url).shutdown(nosave=True)
        wait_for(lambda: _not_ready(base, "broker"), timeout=30, what="503 without the broker")
        assert _get(base, "/healthz").status_code == 200, "alive: no restart for an outage"
    finally:
        stack.stop(timeout=10)


def test_beat_is_ready_while_the_broker_answers(isolated: tuple[str, str], tmp_path: Path) -> None:
    _, redis_url = isolated
    stack, base = _serving("beat", isolated, tmp_path)
    try:
        _started(stack, "beat", base)
        assert _get(base, "/readyz").json() == {"status": "ready", "checks": ["broker"]}
        assert _get(base, "/healthz").json() == {"status": "ok"}

        connect(redis_url).shutdown(nosave=True)
        wait_for(lambda: _not_ready(base, "broker"), timeout=30, what="503 without the broker")
        assert _get(base, "/healthz").status_code == 200
    finally:
        stack.stop(timeout=10)
