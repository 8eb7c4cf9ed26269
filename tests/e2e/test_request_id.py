"""The caller's X-Request-ID goes through the gateway to the service and into its JSON logs.

Ingestion logs nothing for a good, stale, duplicate or rejected event, nor for a validation
error; what it does log is trouble. So the test makes some, confined to a lot of its own: it holds
that lot's ``lot_live`` row locked while a batch for the lot arrives, the batch's statement runs
into the services' statement timeout (5 s by default), and ingestion logs the timeout (and
answers 503) under the request's id.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.stack import Client, Stack, wait_for

pytestmark = pytest.mark.e2e


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue  # gunicorn's own lines are plain text
        if isinstance(value, dict):
            lines.append(value)
    return lines


def _lot(operator: Client) -> str:
    resp = operator.post(
        "/v1/lots",
        json={
            "name": "Request id P1",
            "location": {"lat": 30.2590, "lon": 120.1300},
            "district": f"rid-{uuid.uuid4().hex[:8]}",
            "spaces": [{"id": "A-001", "type": "standard"}],
            "tariff": {"currency": "CNY", "per_hour": "5.00"},
        },
    )
    assert resp.status_code == 201, resp.text
    lot_id: str = resp.json()["id"]
    return lot_id


def _event(lot_id: str) -> dict[str, Any]:
    return {
        "id": f"rid-{uuid.uuid4().hex}",
        "lot_id": lot_id,
        "type": "space",
        "space_id": "A-001",
        "occupied": True,
        "observed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def test_the_request_id_is_echoed_and_logged_by_the_service(
    stack: Stack, new_operator: Any, database_url: str
) -> None:
    _, operator = new_operator("request id co")
    try:
        _check(stack, operator, database_url)
    finally:
        operator.session.close()  # an idle keep-alive connection delays the gateway's stop


def _check(stack: Stack, operator: Client, database_url: str) -> None:
    lot_id = _lot(operator)

    ok_rid = f"trace-{uuid.uuid4()}"
    ok = operator.post(
        "/v1/events", json={"events": [_event(lot_id)]}, headers={"X-Request-ID": ok_rid}
    )
    assert ok.status_code == 200 and ok.json()["accepted"] == 1, ok.text
    assert ok.headers["X-Request-ID"] == ok_rid

    rid = f"trace-{uuid.uuid4()}"
    with psycopg.connect(database_url) as lock, lock.transaction():
        lock.execute("SELECT 1 FROM lot_live WHERE lot_id = %s FOR UPDATE", (lot_id,))
        started = time.monotonic()
        resp = operator.post(
            "/v1/events", json={"events": [_event(lot_id)]}, headers={"X-Request-ID": rid}
        )
        elapsed = time.monotonic() - started
    assert resp.headers["X-Request-ID"] == rid
    assert resp.status_code == 503, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.json()["code"] == "unavailable"
    assert elapsed < 9.0, elapsed  # the statement timeout (5 s), not the gateway's (10 s)

    def logged() -> list[dict[str, Any]]:
        return [
            line for line in _json_lines(stack.log("ingestion")) if line.get("request_id") == rid
        ]

    lines = wait_for(logged, timeout=10, interval=0.1, what="ingestion's log line")
    assert all(line["service"] == "ingestion" for line in lines)
    assert any(line["message"] == "database statement timed out" for line in lines), lines
    # a service that did not handle the request does not log under its id
    assert not any(line.get("request_id") == rid for line in _json_lines(stack.log("availability")))

    # the lock gone, the same batch goes through
    again = operator.post("/v1/events", json={"events": [_event(lot_id)]})
    assert again.status_code == 200 and again.json()["accepted"] == 1, again.text
