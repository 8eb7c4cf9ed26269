"""The lots' booking entries kept in memory are never trusted on their own.

A booking passes the entry it priced by to ``reserve_space_checked``, which compares it with
the lot's row inside the transaction; a change of tariff, opening hours or time zone, or the
lot's deletion, after the entry was read makes the booking read the row again (the stale
attempt writes nothing), and a refusal judged on an entry is judged again on the row.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from services.common.config import ReservationsSettings
from services.common.lots import LotIn
from services.ingestion.registry import create_lot
from services.reservations import booking
from services.reservations import repository as repo
from services.reservations.schemas import ReservationIn

BASE = (datetime.now(UTC) + timedelta(days=2)).replace(hour=2, minute=0, second=0, microsecond=0)


@pytest.fixture
def setup(env: dict[str, str], conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(lot id, driver id): a 24/7 lot at 6.00 an hour, no free minutes, quota 5."""
    operator = conn.execute("INSERT INTO operators (name) VALUES ('cache') RETURNING id")
    operator_id = str(operator.fetchone()[0])  # type: ignore[index]
    lot = LotIn.model_validate(
        {
            "name": "cache",
            "location": {"lat": 30.0, "lon": 120.0},
            "district": "xihu",
            "capacity": {"standard": 10},
            "reservable": {"standard": 5},
            "tariff": {"per_hour": "6.00", "free_minutes": 0},
        }
    )
    lot_id = str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])
    row = conn.execute(
        "INSERT INTO drivers (email, password_hash)"
        " VALUES ('c-' || gen_random_uuid() || '@example.com', 'x') RETURNING id"
    ).fetchone()
    assert row is not None
    return lot_id, str(row[0])


def _reserve(
    conn: psycopg.Connection[Any], lots: booking.LotCache, lot_id: str, driver_id: str, hours: int
) -> booking.Answer:
    start = BASE + timedelta(hours=hours)
    return booking.reserve(
        conn,
        settings=ReservationsSettings(),
        driver_id=driver_id,
        key=uuid.uuid4().hex,
        raw_body={"n": uuid.uuid4().hex},
        request=ReservationIn(
            lot_id=lot_id,
            space_type="standard",
            start=start,
            end=start + timedelta(hours=1),
            plate="浙A1",
        ),
        now=datetime.now(UTC),
        lots=lots,
    )


def test_a_changed_tariff_prices_the_next_booking(
    conn: psycopg.Connection[Any], setup: tuple[str, str]
) -> None:
    lot_id, driver_id = setup
    lots = booking.LotCache(ttl_s=3600)
    first = _reserve(conn, lots, lot_id, driver_id, 0)
    assert first.status == 201 and first.body["price"]["amount"] == "6.00"
    conn.execute(
        "UPDATE lots SET tariff = jsonb_set(tariff, '{per_hour}', '\"9.00\"') WHERE id = %s",
        (lot_id,),
    )
    second = _reserve(conn, lots, lot_id, driver_id, 2)
    assert second.status == 201 and second.body["price"]["amount"] == "9.00"
    stored = conn.execute(
        "SELECT price_amount FROM reservations WHERE id = %s", (second.body["id"],)
    ).fetchone()
    assert stored is not None and stored[0] == Decimal("9.00")


def test_a_stale_entry_writes_nothing(
    conn: psycopg.Connection[Any], setup: tuple[str, str]
) -> None:
    lot_id, driver_id = setup
    lots = booking.LotCache(ttl_s=3600)
    entry, _ = lots.get(conn, lot_id)
    assert entry is not None
    conn.execute("UPDATE lots SET opening_hours = '06:00-22:00' WHERE id = %s", (lot_id,))
    key = uuid.uuid4().hex
    start = BASE + timedelta(hours=30)
    reservation = {
        "id": uuid.uuid4(),
        "driver_id": driver_id,
        "lot_id": lot_id,
        "space_type": "standard",
        "starts_at": start,
        "ends_at": start + timedelta(hours=1),
        "price_amount": Decimal("6.00"),
        "price_currency": "CNY",
        "created_at": datetime.now(UTC),
    }
    with pytest.raises(repo.LotChanged):
        repo.reserve_space_checked(
            conn,
            reservation=reservation,
            plate_hash=b"p" * 32,
            idempotency_key=key,
            request_hash=b"h" * 32,
            max_open=5,
            answers={"created": {"id": "x"}, "no_capacity": {}, "limit": {}},
            lot=entry.checked,
        )
    assert repo.stored_answer(conn, driver_id=driver_id, key=key) is None
    count = conn.execute(
        "SELECT count(*) FROM reservations WHERE id = %s", (reservation["id"],)
    ).fetchone()
    assert count == (0,)


def test_changed_opening_hours_and_deletion_are_seen(
    conn: psycopg.Connection[Any], setup: tuple[str, str]
) -> None:
    lot_id, driver_id = setup
    lots = booking.LotCache(ttl_s=3600)
    assert _reserve(conn, lots, lot_id, driver_id, 0).status == 201  # 02:00 UTC, 10:00 local
    # closed at 10:00 local now: refused, although the cached entry says 24/7
    conn.execute("UPDATE lots SET opening_hours = '12:00-20:00' WHERE id = %s", (lot_id,))
    refused = _reserve(conn, lots, lot_id, driver_id, 24)
    assert refused.status == 422 and refused.body["code"] == "validation"
    # open again: the cached entry says closed, the row says open, and the row wins
    conn.execute("UPDATE lots SET opening_hours = '24/7' WHERE id = %s", (lot_id,))
    assert _reserve(conn, lots, lot_id, driver_id, 48).status == 201
    conn.execute("UPDATE lots SET deleted_at = now() WHERE id = %s", (lot_id,))
    gone = _reserve(conn, lots, lot_id, driver_id, 72)
    assert gone.status == 404 and gone.body["code"] == "not-found"


def test_a_lot_changing_under_every_booking_is_refused_not_looped(
    conn: psycopg.Connection[Any], setup: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lot_id, driver_id = setup

    def always_changed(*args: Any, **kwargs: Any) -> Any:
        raise repo.LotChanged(lot_id)

    monkeypatch.setattr(repo, "reserve_space_checked", always_changed)
    with pytest.raises(booking.Problem) as refused:
        _reserve(conn, booking.LotCache(), lot_id, driver_id, 0)
    assert refused.value.status == 409
