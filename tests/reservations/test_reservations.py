"""Quotes, reservations, idempotency, cancellation and ownership, through the real gateway."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.common.auth import plate_hash
from tests.reservations.helpers import hour, iso, reserve
from tests.stack import Client, Stack

pytestmark = pytest.mark.e2e
PROBLEM = "application/problem+json"


def count(conn: psycopg.Connection[Any], lot_id: str, status: str = "confirmed") -> int:
    row = conn.execute(
        "SELECT count(*) FROM reservations WHERE lot_id = %s AND status = %s", (lot_id, status)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_reserve_returns_the_contract_and_stores_only_the_plate_hash(
    stack: Stack, driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot()
    start, end = hour(1), hour(3)
    resp = reserve(driver, lot, start, end, plate="浙A 12345")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert {"id", "status", "lot_id", "space_type", "start", "end", "price", "created_at"} <= set(
        body
    )
    assert body["status"] == "confirmed" and body["lot_id"] == lot
    assert body["space_type"] == "standard"
    assert datetime.fromisoformat(body["start"]) == start
    assert datetime.fromisoformat(body["end"]) == end
    # 120 minutes, 15 free, 6.00 an hour pro rata: 105 * 0.10
    assert body["price"] == {"amount": "10.50", "currency": "CNY"}
    stored = conn.execute(
        "SELECT plate_hash FROM reservations WHERE id = %s", (body["id"],)
    ).fetchone()
    assert stored is not None
    assert bytes(stored[0]) == plate_hash(stack.env["PARKING_PLATE_HASH_KEY"], "浙A12345")
    assert driver.get(f"/v1/reservations/{body['id']}").json() == body
    assert driver.get("/v1/reservations").json()["items"] == [body]


def test_quote_prices_the_window_and_tells_whether_it_is_available(
    driver: Client, anonymous: Client, make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": 1})
    params = {"space_type": "standard", "start": iso(hour(1)), "end": iso(hour(11))}
    quote = anonymous.get(f"/v1/lots/{lot}/quote", params=params)
    assert quote.status_code == 200
    assert quote.json() == {"price": {"amount": "40.00", "currency": "CNY"}, "available": True}
    assert reserve(driver, lot, hour(5), hour(6)).status_code == 201
    taken = anonymous.get(f"/v1/lots/{lot}/quote", params=params).json()
    assert taken["available"] is False and taken["reason"] == "no-capacity"
    ev = anonymous.get(f"/v1/lots/{lot}/quote", params={**params, "space_type": "ev"}).json()
    assert ev["available"] is False and ev["reason"] == "not-reservable"
    missing = anonymous.get(f"/v1/lots/{uuid.uuid4()}/quote", params=params)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == PROBLEM
    backwards = {**params, "start": params["end"], "end": params["start"]}
    assert anonymous.get(f"/v1/lots/{lot}/quote", params=backwards).status_code == 422
    assert anonymous.get(f"/v1/lots/{lot}/quote", params={"space_type": "x"}).status_code == 422


def test_no_capacity_exactly_when_some_instant_would_exceed_the_quota(
    new_driver: Callable[[], Client], make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": 2})
    drivers = [new_driver() for _ in range(2)]
    n = 0

    def attempt(start: float, end: float) -> int:
        nonlocal n
        n += 1
        return reserve(drivers[n % 2], lot, hour(start), hour(end)).status_code

    assert attempt(10, 12) == 201
    assert attempt(11, 13) == 201
    refused = reserve(drivers[0], lot, hour(11.5), hour(11.75))
    assert refused.status_code == 409 and refused.json()["code"] == "no-capacity"
    assert refused.headers["Content-Type"] == PROBLEM
    assert attempt(12, 14) == 201  # [10, 12) has ended when [12, 14) starts
    assert attempt(13, 15) == 201
    assert attempt(12.5, 13.5) == 409  # [11, 13) and [12, 14) at 12:30
    assert attempt(9, 10) == 201  # touches [10, 12) without overlapping
    assert attempt(15, 16) == 201
    assert attempt(8, 17) == 409  # 2 at 11:00
    # Back-to-back windows never overlap, so a quota of 1 accepts every one of them (drivers
    # with no reservations yet, so the open-reservation limit plays no part); one overlapping
    # them is refused:
    other = make_lot(reservable={"standard": 1})
    fresh = [new_driver() for _ in range(2)]
    base = hour(0)
    for start in range(0, 6):
        resp = reserve(fresh[start % 2], other, hour(start, base), hour(start + 1, base))
        assert resp.status_code == 201, resp.text
    overlapping = reserve(fresh[0], other, hour(2.5, base), hour(3.5, base))
    assert overlapping.status_code == 409 and overlapping.json()["code"] == "no-capacity"


def test_quota_zero_or_missing_is_no_capacity(
    driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(reservable={"standard": 0})
    for space_type in ("standard", "ev", "accessible"):
        resp = reserve(driver, lot, hour(1), hour(2), space_type=space_type)
        assert resp.status_code == 409 and resp.json()["code"] == "no-capacity"
    assert count(conn, lot) == 0


def test_windows_must_be_valid_and_within_opening_hours(
    driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(opening_hours="08:00-20:00", timezone="UTC")
    day = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    now = datetime.now(UTC)
    bad = [
        (day + timedelta(hours=10), day + timedelta(hours=9)),
        (day + timedelta(hours=10), day + timedelta(hours=10)),
        (now - timedelta(minutes=10), now + timedelta(hours=1)),
        (day + timedelta(hours=7), day + timedelta(hours=9)),  # opens at 08:00
        (day + timedelta(hours=19), day + timedelta(hours=21)),  # closes at 20:00
    ]
    for start, end in bad:
        resp = reserve(driver, lot, start, end)
        assert resp.status_code == 422, (start, end, resp.text)
        assert resp.json()["code"] == "validation" and resp.json()["errors"]
    always = make_lot()
    too_long = reserve(driver, always, hour(0), hour(24) + timedelta(minutes=1))
    assert too_long.status_code == 422
    assert reserve(driver, always, hour(0), hour(24)).status_code == 201
    assert reserve(
        driver, lot, day + timedelta(hours=8), day + timedelta(hours=20)
    ).status_code == (201)
    assert count(conn, lot) == 1


def test_bad_bodies_are_problems_and_change_nothing(
    driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot()
    good = {
        "lot_id": lot,
        "space_type": "standard",
        "start": iso(hour(1)),
        "end": iso(hour(2)),
        "plate": "浙A12345",
    }
    for body in (
        {**good, "plate": ""},
        {**good, "plate": "AB_12"},
        {**good, "plate": "A" * 17},
        {**good, "space_type": "truck"},
        {**good, "start": "tomorrow"},
        {**good, "start": hour(1).replace(tzinfo=None).isoformat()},  # no offset
        {k: v for k, v in good.items() if k != "plate"},
        {**good, "extra": 1},
        [good],
    ):
        resp = driver.post(
            "/v1/reservations", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
        )
        assert resp.status_code == 422, body
        assert resp.headers["Content-Type"] == PROBLEM
    unknown = reserve(driver, str(uuid.uuid4()), hour(1), hour(2))
    assert unknown.status_code == 404
    assert reserve(driver, "not-a-uuid", hour(1), hour(2)).status_code == 404
    assert count(conn, lot) == 0


def test_idempotency_keys(
    driver: Client, new_driver: Callable[[], Client], make_lot: Callable[..., str], conn: Any
) -> None:
    lot = make_lot()
    body = {
        "lot_id": lot,
        "space_type": "standard",
        "start": iso(hour(1)),
        "end": iso(hour(2)),
        "plate": "浙A12345",
    }
    missing = driver.post("/v1/reservations", json=body)
    assert missing.status_code == 400 and missing.headers["Content-Type"] == PROBLEM
    too_long = driver.post("/v1/reservations", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400
    key = {"Idempotency-Key": "k" * 255}
    first = driver.post("/v1/reservations", json=body, headers=key)
    assert first.status_code == 201
    reordered = dict(reversed(list(body.items())))
    again = driver.post("/v1/reservations", json=reordered, headers=key)
    assert again.status_code == 201 and again.json() == first.json()
    other = driver.post("/v1/reservations", json={**body, "plate": "浙B99999"}, headers=key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency-key-reused"
    assert count(conn, lot) == 1
    # Keys are per driver: another driver's same key is a new request.
    assert new_driver().post("/v1/reservations", json=body, headers=key).status_code == 201
    assert count(conn, lot) == 2
    # A refusal is an answer too: replayed as it was, even once capacity frees up.
    full = make_lot(reservable={"standard": 1})
    holder = reserve(driver, full, hour(1), hour(2)).json()
    refused_key = {"Idempotency-Key": uuid.uuid4().hex}
    refused = new_driver()
    body_full = {**body, "lot_id": full}
    assert refused.post("/v1/reservations", json=body_full, headers=refused_key).status_code == 409
    assert driver.post(f"/v1/reservations/{holder['id']}/cancel").status_code == 200
    replay = refused.post("/v1/reservations", json=body_full, headers=refused_key)
    assert replay.status_code == 409 and replay.json()["code"] == "no-capacity"
    fresh = refused.post(
        "/v1/reservations", json=body_full, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    assert fresh.status_code == 201


def test_cancel_frees_capacity_at_once_and_only_for_the_owner(
    new_driver: Callable[[], Client], make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(reservable={"standard": 1})
    alice, bob = new_driver(), new_driver()
    mine = reserve(alice, lot, hour(1), hour(3)).json()
    assert reserve(bob, lot, hour(2), hour(4)).status_code == 409

    before = conn.execute("SELECT * FROM reservations WHERE id = %s", (mine["id"],)).fetchone()
    for path in (f"/v1/reservations/{mine['id']}", f"/v1/reservations/{mine['id']}/cancel"):
        method = bob.get if path.count("/") == 3 else bob.post
        resp = method(path)
        assert resp.status_code == 404 and resp.json()["code"] == "not-found", path
    assert bob.get("/v1/reservations").json()["items"] == []
    after = conn.execute("SELECT * FROM reservations WHERE id = %s", (mine["id"],)).fetchone()
    assert before == after
    for missing in (str(uuid.uuid4()), "nope"):
        assert alice.get(f"/v1/reservations/{missing}").status_code == 404
        assert alice.post(f"/v1/reservations/{missing}/cancel").status_code == 404

    cancelled = alice.post(f"/v1/reservations/{mine['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancelled_at"]
    assert reserve(bob, lot, hour(2), hour(4)).status_code == 201
    again = alice.post(f"/v1/reservations/{mine['id']}/cancel")
    assert again.status_code == 409 and again.headers["Content-Type"] == PROBLEM


def test_open_reservations_per_driver_are_capped(
    stack: Stack, driver: Client, make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": 10})
    cap = 5  # PARKING_RESERVATIONS_MAX_OPEN_PER_DRIVER's default
    made = [reserve(driver, lot, hour(i), hour(i + 1)).json() for i in range(cap)]
    refused = reserve(driver, lot, hour(cap), hour(cap + 1))
    assert refused.status_code == 409 and refused.json()["code"] == "reservation-limit"
    assert driver.post(f"/v1/reservations/{made[0]['id']}/cancel").status_code == 200
    assert reserve(driver, lot, hour(cap), hour(cap + 1)).status_code == 201


def test_my_reservations_newest_first_with_a_cursor(
    driver: Client, make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": 5})
    ids = [reserve(driver, lot, hour(i), hour(i + 1)).json()["id"] for i in range(3)]
    page = driver.get("/v1/reservations", params={"limit": 2}).json()
    assert [r["id"] for r in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    rest = driver.get("/v1/reservations", params={"limit": 2, "cursor": page["next_cursor"]})
    assert [r["id"] for r in rest.json()["items"]] == ids[:1]
    assert rest.json()["next_cursor"] is None
    assert driver.get("/v1/reservations", params={"limit": 101}).status_code == 422
    assert driver.get("/v1/reservations", params={"cursor": "garbage"}).status_code == 422


def test_routes_are_in_the_merged_openapi_document(anonymous: Client) -> None:
    paths = anonymous.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/drivers",
        "/v1/auth/token",
        "/v1/reservations",
        "/v1/reservations/{reservation_id}",
        "/v1/reservations/{reservation_id}/cancel",
        "/v1/lots/{lot_id}/quote",
    ):
        assert path in paths, path
    post = paths["/v1/reservations"]["post"]
    assert any(p["name"] == "Idempotency-Key" for p in post.get("parameters", [])), post
