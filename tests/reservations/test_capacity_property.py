"""Property: a booking is refused with no-capacity exactly when its window would push the
confirmed reservations over the quota at some instant; cancelling frees capacity at once.

Random sequences of reservations and cancellations against the real PostgreSQL (the booking
domain function and ``reserve_space``), checked against a plain model of the windows.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.config import ReservationsSettings
from services.common.lots import LotIn
from services.ingestion.registry import create_lot
from services.reservations import booking
from services.reservations.schemas import ReservationIn
from tests.stack import wait_for

BASE = (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
QUARTER = timedelta(minutes=15)

window = st.tuples(st.integers(0, 16), st.integers(1, 8))  # (start, length) in quarter hours
step = st.one_of(
    st.tuples(st.just("reserve"), window, st.integers(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 20), st.just(0)),
)


def peak(windows: list[tuple[datetime, datetime]], start: datetime, end: datetime) -> int:
    clipped = [(max(s, start), min(e, end)) for s, e in windows if s < end and e > start]
    edges = sorted([(s, 1) for s, _ in clipped] + [(e, -1) for _, e in clipped])
    running = best = 0
    for _, delta in edges:
        running += delta
        best = max(best, running)
    return best


def test_no_capacity_exactly_when_some_instant_is_full(
    env: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    config = ReservationsSettings(max_open_per_driver=1000)
    operator = conn.execute("INSERT INTO operators (name) VALUES ('property') RETURNING id")
    operator_id = str(operator.fetchone()[0])  # type: ignore[index]
    drivers = [
        str(r[0])
        for r in conn.execute(
            "INSERT INTO drivers (email, password_hash) SELECT 'p-' || gen_random_uuid()"
            " || '@example.com', 'x' FROM generate_series(1, 3) RETURNING id"
        ).fetchall()
    ]

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(quota=st.integers(0, 3), steps=st.lists(step, min_size=1, max_size=14))
    def run(quota: int, steps: list[tuple[str, Any, int]]) -> None:
        lot = LotIn.model_validate(
            {
                "name": "property",
                "location": {"lat": 30.0, "lon": 120.0},
                "district": "xihu",
                "capacity": {"standard": 10},
                "reservable": {"standard": quota},
                "tariff": {"per_hour": "5.00"},
            }
        )
        lot_id = str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])
        held: dict[str, tuple[str, datetime, datetime]] = {}  # id -> (driver, start, end)
        for kind, arg, who in steps:
            if kind == "cancel":
                if not held:
                    continue
                rid = sorted(held)[arg % len(held)]
                answer = booking.cancel(conn, driver_id=held[rid][0], reservation_id=rid)
                assert answer.status == 200 and answer.body["status"] == "cancelled"
                del held[rid]
                continue
            start = BASE + arg[0] * QUARTER
            end = start + arg[1] * QUARTER
            expected = peak([(s, e) for _, s, e in held.values()], start, end) + 1 <= quota
            answer = booking.reserve(
                conn,
                settings=config,
                driver_id=drivers[who],
                key=uuid.uuid4().hex,
                raw_body={"n": uuid.uuid4().hex},
                request=ReservationIn(
                    lot_id=lot_id, space_type="standard", start=start, end=end, plate="浙A1"
                ),
                now=datetime.now(UTC),
            )
            if expected:
                assert answer.status == 201, (quota, start, end, held)
                held[answer.body["id"]] = (drivers[who], start, end)
            else:
                assert answer.status == 409 and answer.body["code"] == "no-capacity"
        stored = conn.execute(
            "SELECT id::text FROM reservations WHERE lot_id = %s AND status = 'confirmed'",
            (lot_id,),
        ).fetchall()
        assert {r[0] for r in stored} == set(held)

    run()


def test_a_booking_waits_for_a_concurrent_one_and_then_sees_it(
    env: dict[str, str], database_url: str, conn: psycopg.Connection[Any]
) -> None:
    """The lock, then a fresh snapshot: the second booking of the last space waits for the
    first to commit and is then refused, not granted on what it saw before waiting."""
    config = ReservationsSettings()
    operator = conn.execute("INSERT INTO operators (name) VALUES ('race') RETURNING id")
    operator_id = str(operator.fetchone()[0])  # type: ignore[index]
    lot = LotIn.model_validate(
        {
            "name": "race",
            "location": {"lat": 30.0, "lon": 120.0},
            "district": "xihu",
            "capacity": {"standard": 5},
            "reservable": {"standard": 1},
            "tariff": {"per_hour": "5.00"},
        }
    )
    lot_id = str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])
    drivers = [
        str(r[0])
        for r in conn.execute(
            "INSERT INTO drivers (email, password_hash) SELECT 'r-' || gen_random_uuid()"
            " || '@example.com', 'x' FROM generate_series(1, 2) RETURNING id"
        ).fetchall()
    ]

    def book(c: psycopg.Connection[Any], driver_id: str, hours: tuple[int, int]) -> Any:
        return booking.reserve(
            c,
            settings=config,
            driver_id=driver_id,
            key=uuid.uuid4().hex,
            raw_body={"n": uuid.uuid4().hex},
            request=ReservationIn(
                lot_id=lot_id,
                space_type="standard",
                start=BASE + timedelta(hours=hours[0]),
                end=BASE + timedelta(hours=hours[1]),
                plate="浙A1",
            ),
            now=datetime.now(UTC),
        )

    with (
        psycopg.connect(database_url, autocommit=True) as first,
        psycopg.connect(database_url, autocommit=True) as second,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        second_pid = second.info.backend_pid
        with first.transaction():
            assert book(first, drivers[0], (1, 3)).status == 201
            waiting = pool.submit(book, second, drivers[1], (2, 4))
            wait_for(
                lambda: (
                    conn.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (second_pid,),
                    ).fetchone()
                    == (True,)
                ),
                timeout=10,
                what="the second booking waiting on the lock",
            )
            assert not waiting.done()
        answer = waiting.result(timeout=10)
    assert answer.status == 409 and answer.body["code"] == "no-capacity"
