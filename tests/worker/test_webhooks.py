"""Webhook notification and delivery rules on a database of their own (no other worker)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
import urllib3

from services.worker import webhooks
from tests.city import facts
from tests.stack import create_database, drop_database, free_port


@pytest.fixture
def own_db(servers: tuple[str, str]) -> Iterator[psycopg.Connection[Any]]:
    url = create_database(servers[0])
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
    finally:
        drop_database(servers[0], url)


@pytest.fixture
def failing_server() -> Iterator[tuple[str, list[bytes]]]:
    """A receiver that answers 503 to everything, keeping the bodies."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    server.shutdown()
    server.server_close()
    thread.join(5)


def _subscribe(conn: psycopg.Connection[Any], url: str, events: list[str]) -> dict[str, Any]:
    row = conn.execute("INSERT INTO city_clients (name) VALUES ('c') RETURNING id").fetchone()
    assert row is not None
    return webhooks.create_subscription(
        conn, city_client_id=str(row[0]), url=url, events=events, secret="k" * 32
    )


def test_signature_and_backoff() -> None:
    body = b'{"a": 1}'
    expected = hmac.new(b"secret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.signature("secret", "1700000000", body) == f"sha256={expected}"
    delays = [webhooks.backoff(n, base_s=2, max_s=60) for n in range(1, 8)]
    assert delays == [2, 4, 8, 16, 32, 60, 60]


def test_status_changes_are_notified_once_per_crossing(own_db: psycopg.Connection[Any]) -> None:
    conn = own_db
    sub = _subscribe(conn, "http://127.0.0.1:9/x", ["lot.full", "lot.available"])
    op = facts.operator(conn)
    lot_id = facts.lot(conn, op, district="hooks", spaces=1)
    now = datetime.now(UTC)
    assert webhooks.detect_status_changes(conn, now=now) == 0  # first seen, available: silent
    facts.ingest(conn, op, [facts.space(lot_id, "S-000", True, now)])
    assert webhooks.detect_status_changes(conn, now=now) == 1
    assert webhooks.detect_status_changes(conn, now=now) == 0  # the same state: nothing new
    facts.ingest(conn, op, [facts.space(lot_id, "S-000", False, now + timedelta(seconds=1))])
    assert webhooks.detect_status_changes(conn, now=now) == 1
    facts.ingest(conn, op, [facts.space(lot_id, "S-000", True, now + timedelta(seconds=2))])
    assert webhooks.detect_status_changes(conn, now=now) == 1
    events = [
        r[0]
        for r in conn.execute(
            "SELECT event FROM webhook_deliveries WHERE subscription_id = %s ORDER BY id",
            (sub["id"],),
        )
    ]
    assert events == ["lot.full", "lot.available", "lot.full"]


def test_district_snapshots_once_per_period(own_db: psycopg.Connection[Any]) -> None:
    conn = own_db
    _subscribe(conn, "http://127.0.0.1:9/x", ["district.snapshot"])
    _subscribe(conn, "http://127.0.0.1:9/y", ["lot.full"])
    op = facts.operator(conn)
    facts.lot(conn, op, district="north", capacity={"standard": 10})
    now = datetime(2026, 5, 1, 12, 0, 10, tzinfo=UTC)
    assert webhooks.enqueue_district_snapshots(conn, now=now, every_s=300) == 1
    assert (
        webhooks.enqueue_district_snapshots(conn, now=now + timedelta(seconds=60), every_s=300) == 0
    )
    assert (
        webhooks.enqueue_district_snapshots(conn, now=now + timedelta(seconds=300), every_s=300)
        == 1
    )
    payload = conn.execute("SELECT payload FROM webhook_deliveries LIMIT 1").fetchone()
    assert payload is not None
    assert payload[0]["districts"] == [
        {
            "district": "north",
            "capacity": 10,
            "occupied": 0,
            "free": 10,
            "occupancy_rate": 0.0,
            "lots": 1,
        }
    ]


def test_deliveries_retry_with_backoff_then_fail(
    own_db: psycopg.Connection[Any], failing_server: tuple[str, list[bytes]]
) -> None:
    conn = own_db
    url, bodies = failing_server
    failing = _subscribe(conn, url, ["district.snapshot"])
    unreachable = _subscribe(conn, f"http://127.0.0.1:{free_port()}/gone", ["district.snapshot"])
    op = facts.operator(conn)
    facts.lot(conn, op, district="south", capacity={"standard": 4})
    webhooks.enqueue_district_snapshots(conn, now=datetime.now(UTC), every_s=60)
    http = urllib3.PoolManager()
    outcomes: list[dict[str, int]] = []
    for _ in range(50):  # bounded: three attempts each, a few milliseconds apart
        conn.execute(
            "UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1s'"
            " WHERE status = 'pending'"
        )
        outcomes.append(
            webhooks.deliver_due(
                conn,
                http,
                timeout_s=2,
                max_attempts=3,
                backoff_s=60,
                backoff_max_s=600,
                allow_private=True,
            )
        )
        pending = conn.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
        ).fetchone()
        if pending == (0,):
            break
    log = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT subscription_id::text, status, attempts, last_status_code, last_error,"
            " next_attempt_at - now() > interval '30 seconds' FROM webhook_deliveries"
        )
    }
    assert log[failing["id"]][:4] == ("failed", 3, 503, "HTTP 503")
    assert log[unreachable["id"]][0:3] == ("failed", 3, None)
    assert log[unreachable["id"]][3]  # the connection error is named
    assert len(bodies) == 3 and len(set(bodies)) == 1  # the same body on every attempt
    assert outcomes[0] == {"delivered": 0, "pending": 2, "failed": 0}


def test_an_unsubscribed_delivery_is_not_sent(own_db: psycopg.Connection[Any]) -> None:
    conn = own_db
    sub = _subscribe(conn, "http://127.0.0.1:9/x", ["district.snapshot"])
    op = facts.operator(conn)
    facts.lot(conn, op, district="east", capacity={"standard": 4})
    webhooks.enqueue_district_snapshots(conn, now=datetime.now(UTC), every_s=60)
    owner = conn.execute(
        "SELECT city_client_id::text FROM city_subscriptions WHERE id = %s", (sub["id"],)
    ).fetchone()
    assert owner is not None
    other = str(uuid.uuid4())
    assert not webhooks.delete_subscription(conn, city_client_id=other, subscription_id=sub["id"])
    assert webhooks.delete_subscription(conn, city_client_id=owner[0], subscription_id=sub["id"])
    assert webhooks.claim_due(conn, now=datetime.now(UTC), lease_s=30) == []
    status = conn.execute("SELECT status, last_error FROM webhook_deliveries").fetchone()
    assert status == ("failed", "unsubscribed")


def test_private_destinations_are_refused(
    own_db: psycopg.Connection[Any], failing_server: tuple[str, list[bytes]]
) -> None:
    conn = own_db
    url, bodies = failing_server
    for target in ("http://127.0.0.1/x", "http://10.1.2.3/x", "http://169.254.169.254/latest"):
        assert not webhooks.public_destination(target)
    assert webhooks.public_destination("http://93.184.216.34/hook")
    _subscribe(conn, url, ["district.snapshot"])
    op = facts.operator(conn)
    facts.lot(conn, op, district="west", capacity={"standard": 4})
    webhooks.enqueue_district_snapshots(conn, now=datetime.now(UTC), every_s=60)
    webhooks.deliver_due(
        conn, urllib3.PoolManager(), timeout_s=2, max_attempts=1, backoff_s=1, backoff_max_s=1
    )
    row = conn.execute("SELECT status, last_error FROM webhook_deliveries").fetchone()
    assert row is not None and row[0] == "failed" and "not allowed" in row[1]
    assert bodies == []  # nothing reached the receiver
