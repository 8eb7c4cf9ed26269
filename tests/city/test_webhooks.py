"""Signed webhooks from the real worker to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.stack import Client, Stack, wait_for

SECRET = "whsec-" + uuid.uuid4().hex


class Receiver:
    """Verifies every signature; answers 500 to the first ``fail_first`` attempts of each
    delivery and 200 after, keeping what it accepted."""

    def __init__(self, fail_first: int = 2) -> None:
        self.fail_first = fail_first
        self.attempts: dict[str, int] = {}
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                timestamp = self.headers.get("X-Parking-Timestamp", "")
                expected = hmac.new(
                    SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
                ).hexdigest()
                given = self.headers.get("X-Parking-Signature", "")
                fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
                if not (fresh and hmac.compare_digest(given, f"sha256={expected}")):
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                delivery = self.headers["X-Parking-Delivery"]
                with receiver.lock:
                    receiver.attempts[delivery] = receiver.attempts.get(delivery, 0) + 1
                    ok = receiver.attempts[delivery] > receiver.fail_first
                    if ok:
                        receiver.accepted.append(
                            {"attempt": receiver.attempts[delivery], **json.loads(body)}
                        )
                self.send_response(200 if ok else 500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/parking"

    def find(self, event: str, match: Any) -> dict[str, Any] | None:
        with self.lock:
            return next(
                (d for d in self.accepted if d["event"] == event and match(d["data"])), None
            )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
    r.thread.join(5)


def test_lot_and_district_webhooks_are_signed_and_retried(
    stack: Stack,
    new_city: Any,
    new_operator: Any,
    receiver: Receiver,
) -> None:
    _, city = new_city("webhook city")
    _, operator = new_operator("webhook operator")
    district = f"d{uuid.uuid4().hex[:8]}"
    lot = operator.post(
        "/v1/lots",
        json={
            "name": "Hook P1",
            "location": {"lat": 30.1352, "lon": 120.0876},
            "district": district,
            "spaces": [{"id": "S-000"}, {"id": "S-001"}],
            "tariff": {"currency": "CNY", "per_hour": "5.00"},
        },
    )
    assert lot.status_code == 201, lot.text
    lot_id = lot.json()["id"]
    # The lot exists before the subscription, so every district.snapshot the subscription gets
    # (the first is enqueued on the worker's next tick) lists the lot's district.
    made = city.post(
        "/v1/city/subscriptions",
        json={
            "url": receiver.url,
            "events": ["lot.full", "lot.available", "district.snapshot"],
            "secret": SECRET,
        },
    )
    assert made.status_code == 201, made.text
    subscription = made.json()["id"]
    now = datetime.now(UTC)

    def post(space_id: str, occupied: bool, at: datetime) -> None:
        event = {
            "id": uuid.uuid4().hex,
            "lot_id": lot_id,
            "type": "space",
            "space_id": space_id,
            "occupied": occupied,
            "observed_at": at.isoformat(),
        }
        resp = operator.post("/v1/events", json={"events": [event]})
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text

    post("S-000", True, now)
    post("S-001", True, now)

    def of_lot(data: dict[str, Any]) -> bool:
        return data["lot"]["id"] == lot_id

    full = wait_for(
        lambda: receiver.find("lot.full", of_lot), timeout=90, interval=0.2, what="lot.full"
    )
    assert full["attempt"] == 3 and full["data"]["lot"]["free"] == 0
    assert full["data"]["lot"]["district"] == district
    post("S-001", False, now + timedelta(seconds=1))
    available = wait_for(
        lambda: receiver.find("lot.available", of_lot),
        timeout=90,
        interval=0.2,
        what="lot.available",
    )
    assert available["attempt"] == 3 and available["data"]["lot"]["free"] == 1
    snapshot = wait_for(
        lambda: receiver.find(
            "district.snapshot",
            lambda d: any(x["district"] == district for x in d["districts"]),
        ),
        timeout=90,
        interval=0.2,
        what=f"district.snapshot listing {district}",
    )
    assert snapshot["attempt"] == 3
    ours_district = [x for x in snapshot["data"]["districts"] if x["district"] == district]
    assert len(ours_district) == 1
    assert (ours_district[0]["capacity"], ours_district[0]["lots"]) == (2, 1)
    assert receiver.bad_signatures == 0

    log = _deliveries(city, subscription)
    lot_events = {d["event"]: d for d in log if d["event"] in ("lot.full", "lot.available")}
    for event in ("lot.full", "lot.available"):
        assert lot_events[event]["status"] == "delivered"
    ours = [d for d in log if str(d["id"]) in (full["id"], available["id"])]
    assert len(ours) == 2
    for d in ours:
        assert (d["status"], d["attempts"], d["last_status_code"]) == ("delivered", 3, 200)
        assert d["delivered_at"]
    # each notification was delivered once: the retries were of the same delivery
    assert sum(1 for d in receiver.accepted if d["id"] == full["id"]) == 1


def _deliveries(city: Client, subscription: str) -> list[dict[str, Any]]:
    resp = city.get(f"/v1/city/subscriptions/{subscription}/deliveries")
    assert resp.status_code == 200
    items: list[dict[str, Any]] = resp.json()["items"]
    return items
