"""The lifecycle: arrival and departure by gate events, no-shows and key cleanup by the worker,
and the lot's live ``reserved`` / ``free`` through the availability API."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from celery import Celery

from services.common.auth import plate_hash
from services.common.redis import celery_broker_url
from services.reservations.lifecycle import GateEvent, apply_gate_events
from tests.reservations.conftest import Tariff
from tests.reservations.helpers import hour, reserve
from tests.stack import Client, Stack, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def operator_lot(new_operator: Any) -> tuple[str, Client]:
    """A gate-counted lot registered through the gateway: (lot id, its operator)."""
    _, operator = new_operator("lifecycle")
    resp = operator.post(
        "/v1/lots",
        json={
            "name": "Yunqi Town P1",
            "location": {"lat": 30.1352, "lon": 120.0876},
            "district": "xihu",
            "capacity": {"standard": 20, "ev": 2},
            "reservable": {"standard": 3},
            "tariff": Tariff,
        },
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], operator


def status_of(conn: psycopg.Connection[Any], reservation_id: str) -> str:
    row = conn.execute(
        "SELECT status FROM reservations WHERE id = %s", (reservation_id,)
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_gate_events_move_reservations(
    stack: Stack,
    driver: Client,
    make_lot: Callable[..., str],
    conn: psycopg.Connection[Any],
) -> None:
    lot, other_lot = make_lot(), make_lot()
    start, end = hour(1), hour(3)
    made = reserve(driver, lot, start, end, plate="浙A 7777").json()
    plate = plate_hash(stack.env["PARKING_PLATE_HASH_KEY"], "浙a7777")
    stranger = plate_hash(stack.env["PARKING_PLATE_HASH_KEY"], "浙A8888")

    def apply(*events: GateEvent) -> int:
        with conn.transaction():
            return apply_gate_events(conn, events=list(events))

    # Not this lot, not this plate, too early, too late: nothing moves.
    assert (
        apply(
            GateEvent(other_lot, "entry", plate, start),
            GateEvent(lot, "entry", stranger, start),
            GateEvent(lot, "entry", plate, start - timedelta(minutes=16)),
            GateEvent(lot, "entry", plate, end),
            GateEvent(lot, "exit", plate, start),
        )
        == 0
    )
    assert status_of(conn, made["id"]) == "confirmed"
    # Up to 15 minutes early is an arrival.
    arrived = start - timedelta(minutes=10)
    assert apply(GateEvent(lot, "entry", plate, arrived)) == 1
    shown = driver.get(f"/v1/reservations/{made['id']}").json()
    assert shown["status"] == "active"
    assert datetime.fromisoformat(shown["arrived_at"]) == arrived
    assert driver.post(f"/v1/reservations/{made['id']}/cancel").status_code == 409
    # An exit before the arrival is an earlier visit; the next one completes it.
    assert apply(GateEvent(lot, "exit", plate, arrived - timedelta(minutes=1))) == 0
    assert apply(GateEvent(lot, "exit", plate, start + timedelta(hours=1))) == 1
    assert driver.get(f"/v1/reservations/{made['id']}").json()["status"] == "completed"


def test_entry_and_exit_in_one_batch_complete_the_reservation(
    stack: Stack, driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(reservable={"standard": 3})
    first = reserve(driver, lot, hour(1), hour(2), plate="浙B1").json()
    second = reserve(driver, lot, hour(2), hour(3), plate="浙B1").json()
    plate = plate_hash(stack.env["PARKING_PLATE_HASH_KEY"], "浙B1")
    with conn.transaction():
        changed = apply_gate_events(
            conn,
            events=[
                GateEvent(lot, "exit", plate, hour(1.5)),
                GateEvent(lot, "entry", plate, hour(1.1)),
            ],
        )
    assert changed == 2
    assert status_of(conn, first["id"]) == "completed"
    assert status_of(conn, second["id"]) == "confirmed"  # one entry, one reservation


def test_gate_events_through_ingestion_activate_and_complete(
    driver: Client, operator_lot: tuple[str, Client]
) -> None:
    lot, operator = operator_lot
    now = datetime.now(UTC)
    made = reserve(driver, lot, now, now + timedelta(hours=2), plate="浙C 12345").json()

    def send(kind: str, plate: str) -> None:
        event = {
            "id": f"gate-{uuid.uuid4().hex}",
            "lot_id": lot,
            "type": kind,
            "space_type": "standard",
            "observed_at": datetime.now(UTC).isoformat(),
            "plate": plate,
        }
        resp = operator.post("/v1/events", json={"events": [event]})
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text

    def status() -> str:
        return str(driver.get(f"/v1/reservations/{made['id']}").json()["status"])

    send("entry", "浙C99999")
    assert status() == "confirmed"
    send("entry", "浙c12345")
    wait_for(lambda: status() == "active", timeout=10, what="arrival")
    send("exit", "浙C12345")
    wait_for(lambda: status() == "completed", timeout=10, what="departure")


def test_reserved_and_free_follow_reserve_and_cancel(
    driver: Client, anonymous: Client, operator_lot: tuple[str, Client]
) -> None:
    lot, _ = operator_lot

    def counts() -> tuple[int, int]:
        body = anonymous.get(f"/v1/lots/{lot}").json()
        return body["reserved"].get("standard", 0), body["free"]["standard"]

    assert counts() == (0, 20)
    now = datetime.now(UTC)
    later = reserve(driver, lot, now + timedelta(hours=3), now + timedelta(hours=4)).json()
    assert counts() == (0, 20)  # not yet
    current = reserve(driver, lot, now, now + timedelta(hours=2)).json()
    assert counts() == (1, 19)
    assert driver.post(f"/v1/reservations/{current['id']}/cancel").status_code == 200
    assert counts() == (0, 20)
    assert driver.post(f"/v1/reservations/{later['id']}/cancel").status_code == 200


def celery_client(stack: Stack) -> Celery:
    app = Celery("reservation-tests", broker=celery_broker_url(stack.env["REDIS_URL"]))
    app.conf.task_default_queue = "parking"
    return app


def test_the_worker_marks_no_shows(
    stack: Stack, driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(reservable={"standard": 3})
    made = reserve(driver, lot, hour(1), hour(2)).json()
    fresh = reserve(driver, lot, hour(1), hour(2)).json()
    arrived = reserve(driver, lot, hour(1), hour(2)).json()
    now = datetime.now(UTC)
    # Windows in the past cannot be booked; move three booked ones back in time instead.
    conn.execute(
        "UPDATE reservations SET starts_at = %s, ends_at = %s WHERE id = %s",
        (now - timedelta(minutes=16), now + timedelta(hours=1), made["id"]),
    )
    conn.execute(
        "UPDATE reservations SET starts_at = %s, ends_at = %s WHERE id = %s",
        (now - timedelta(minutes=5), now + timedelta(hours=1), fresh["id"]),
    )
    conn.execute(
        "UPDATE reservations SET starts_at = %s, ends_at = %s, status = 'active',"
        " arrived_at = %s WHERE id = %s",
        (now - timedelta(minutes=30), now + timedelta(hours=1), now, arrived["id"]),
    )
    celery_client(stack).send_task("services.worker.reservation_tasks.mark_no_shows")
    wait_for(lambda: status_of(conn, made["id"]) == "no_show", timeout=60, what="no-show")
    assert status_of(conn, fresh["id"]) == "confirmed"  # within the 15 minutes' grace
    assert status_of(conn, arrived["id"]) == "active"
    assert driver.post(f"/v1/reservations/{made['id']}/cancel").status_code == 409


def test_the_worker_cleans_up_idempotency_keys_after_a_day(
    stack: Stack, driver: Client, make_lot: Callable[..., str], conn: psycopg.Connection[Any]
) -> None:
    lot = make_lot(reservable={"standard": 3})
    old_key, new_key = uuid.uuid4().hex, uuid.uuid4().hex
    assert reserve(driver, lot, hour(1), hour(2), key=old_key).status_code == 201
    assert reserve(driver, lot, hour(1), hour(2), key=new_key).status_code == 201
    conn.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = %s",
        (old_key,),
    )
    conn.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '23 hours' WHERE key = %s",
        (new_key,),
    )

    def exists(key: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM idempotency_keys WHERE key = %s", (key,)).fetchone()
            is not None
        )

    celery_client(stack).send_task("services.worker.reservation_tasks.clean_idempotency_keys")
    wait_for(lambda: not exists(old_key), timeout=60, what="key cleanup")
    assert exists(new_key)


def test_an_arrival_moves_the_space_from_reserved_to_occupied(
    driver: Client, anonymous: Client, operator_lot: tuple[str, Client]
) -> None:
    lot, operator = operator_lot
    now = datetime.now(UTC)
    reserve(driver, lot, now, now + timedelta(hours=2), plate="浙D 55555")

    def counts() -> tuple[int, int, int]:
        body = anonymous.get(f"/v1/lots/{lot}").json()
        return (
            body["reserved"].get("standard", 0),
            body["occupied"]["standard"],
            body["free"]["standard"],
        )

    assert counts() == (1, 0, 19)
    event = {
        "id": f"gate-{uuid.uuid4().hex}",
        "lot_id": lot,
        "type": "entry",
        "space_type": "standard",
        "observed_at": datetime.now(UTC).isoformat(),
        "plate": "浙D55555",
    }
    assert operator.post("/v1/events", json={"events": [event]}).json()["accepted"] == 1
    assert counts() == (0, 1, 19)
