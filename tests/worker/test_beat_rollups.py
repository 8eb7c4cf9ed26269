"""The beat and the worker keep the buckets up to date, late events included, end to end."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis

from services.worker import rollups
from tests.city import facts
from tests.stack import Stack, wait_for

M = timedelta(minutes=1)


def _bucket(
    conn: psycopg.Connection[Any], level: str, key: str, interval: str, at: datetime
) -> tuple | None:
    return conn.execute(
        "SELECT occupied_avg, occupied_max, capacity, entries, exits FROM occupancy_buckets"
        " WHERE level = %s AND key = %s AND interval = %s AND bucket = %s",
        (level, key, interval, at),
    ).fetchone()


def test_beat_rolls_up_new_minutes_and_late_events(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    op, operator = new_operator("beat rollups")
    district = f"d{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    lot_id = facts.lot(
        conn,
        op,
        district=district,
        spaces=2,
        created_at=now - timedelta(hours=1),
        client=redis_client,
    )

    def post(space_id: str, at: datetime) -> None:
        event = {
            "id": uuid.uuid4().hex,
            "lot_id": lot_id,
            "type": "space",
            "space_id": space_id,
            "occupied": True,
            "observed_at": at.isoformat(),
        }
        resp = operator.post("/v1/events", json={"events": [event]})
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text

    post("S-000", now)
    minute = rollups.floor_to(now, M)
    wait_for(
        lambda: (b := _bucket(conn, "lot", lot_id, "1m", minute)) and b[1] == 1,
        timeout=150,
        interval=0.5,
        what="the minute of the event rolled up",
    )
    assert _bucket(conn, "district", district, "1m", minute) is not None
    assert _bucket(conn, "city", "city", "1m", minute) is not None
    assert _bucket(conn, "lot", lot_id, "15m", rollups.floor_to(minute, 15 * M)) is not None
    assert _bucket(conn, "lot", lot_id, "1h", rollups.floor_to(minute, 60 * M)) is not None

    # older than the minutes every run recomputes: only the late-event path can fill it in
    late_minute = minute - 6 * M
    post("S-001", late_minute + timedelta(seconds=30))
    wait_for(
        lambda: (b := _bucket(conn, "lot", lot_id, "1m", late_minute)) and b[1] == 1,
        timeout=150,
        interval=0.5,
        what="the late event's minute recomputed",
    )
    late = _bucket(conn, "lot", lot_id, "1m", late_minute)
    assert late is not None and (late[0], late[3]) == (0.5, 1)
    # the minutes after it hold the late space's state too (sample and hold)
    between = _bucket(conn, "lot", lot_id, "1m", late_minute + 2 * M)
    assert between is not None and between[0] == 1.0
    assert _bucket(conn, "district", district, "1m", late_minute)[1] == 1  # type: ignore[index]


def test_the_periodic_tasks_run_without_errors(stack: Stack) -> None:
    def ran() -> bool:
        log = stack.log("worker")
        return all(
            f"services.worker.tasks.{name}[" in log and "succeeded" in log
            for name in ("maintain_partitions", "rollup_recent", "webhooks_tick")
        )

    wait_for(ran, timeout=120, interval=0.5, what="the periodic tasks")
    failed = [
        line
        for line in stack.log("worker").splitlines()
        if "services.worker.tasks." in line and ("raised unexpected" in line or "retry" in line)
    ]
    assert not failed, failed[:2]
