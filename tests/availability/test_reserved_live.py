"""Reservations made through the reservations API, seen in the lot's detail: at once when made
or cancelled, and when a window starts (the cached counts expire at the next boundary)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.availability import facts
from tests.reservations.helpers import mint_drivers, reserve
from tests.stack import Client, Stack, wait_for


def test_reserved_follows_reservations_made_cancelled_and_starting(
    stack: Stack, anonymous: Client, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lat, lon = facts.somewhere()
    resp = operator.post(
        "/v1/lots",
        json={
            "name": "Reserved P1",
            "location": {"lat": lat, "lon": lon},
            "district": "xihu",
            "capacity": {"standard": 5},
            "reservable": {"standard": 3},
            "tariff": facts.TARIFF,
        },
    )
    assert resp.status_code == 201, resp.text
    lot_id = resp.json()["id"]
    (driver,) = mint_drivers(stack, conn, 1)

    def reserved() -> int:
        body = anonymous.get(f"/v1/lots/{lot_id}").json()
        assert body["free"]["standard"] == 5 - body["reserved"]["standard"]
        return int(body["reserved"]["standard"])

    assert reserved() == 0
    now = datetime.now(UTC)
    first = reserve(driver, lot_id, now, now + timedelta(hours=1), plate="浙A10001")
    assert first.status_code == 201, first.text
    assert reserved() == 1  # the very next request
    soon = datetime.now(UTC) + timedelta(seconds=3)
    second = reserve(driver, lot_id, soon, soon + timedelta(hours=1), plate="浙A10002")
    assert second.status_code == 201, second.text
    assert reserved() == 1  # its window has not started
    wait_for(lambda: reserved() == 2, timeout=15, interval=0.2, what="the window to start")
    assert datetime.now(UTC) >= soon
    cancelled = driver.post(f"/v1/reservations/{first.json()['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert reserved() == 1
