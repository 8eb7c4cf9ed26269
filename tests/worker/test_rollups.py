"""Rollups against the real PostgreSQL: exact minutes, upserts, idempotency, late events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.worker import rollups
from tests.city import facts

S = timedelta(seconds=1)
M = timedelta(minutes=1)


def rows(conn: psycopg.Connection[Any], level: str, key: str, interval: str = "1m") -> dict:
    return {
        r[0]: tuple(r[1:])
        for r in conn.execute(
            "SELECT bucket, round(occupied_avg::numeric, 6)::float8, occupied_max, capacity,"
            " entries, exits FROM occupancy_buckets WHERE level = %s AND key = %s AND interval = %s"
            " ORDER BY bucket",
            (level, key, interval),
        ).fetchall()
    }


def approx(value: float) -> Any:
    return pytest.approx(value, abs=1e-6)


@pytest.fixture
def scene(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """A space lot and a gate lot in one district, with events around t0 (3 days ago)."""
    t0 = rollups.floor_to(datetime.now(UTC) - timedelta(days=3), timedelta(hours=1))
    district = f"d{uuid.uuid4().hex[:8]}"
    op = facts.operator(conn)
    created = t0 - timedelta(hours=1)
    spaces = facts.lot(conn, op, district=district, spaces=4, created_at=created)
    gates = facts.lot(conn, op, district=district, capacity={"standard": 3}, created_at=created)
    facts.ingest(
        conn,
        op,
        [
            facts.space(spaces, "S-000", True, t0 - 2 * M),
            facts.space(spaces, "S-000", False, t0 + 10 * S),
            facts.space(spaces, "S-001", True, t0 + 30 * S),
            facts.space(spaces, "S-002", True, t0 + 45 * S),
            facts.count(gates, {"standard": 1}, t0 - 1 * M),
            facts.gate(gates, "entry", t0 + 15 * S),
            facts.gate(gates, "entry", t0 + 20 * S),
            facts.gate(gates, "exit", t0 + 40 * S),
            facts.gate(gates, "exit", t0 + 50 * S),
            # minute 2: the count is clamped to capacity, as the live count is
            facts.gate(gates, "entry", t0 + M + 10 * S),
            facts.gate(gates, "entry", t0 + M + 20 * S),
            facts.gate(gates, "entry", t0 + M + 30 * S),
            facts.gate(gates, "exit", t0 + M + 40 * S),
        ],
    )
    return {"t0": t0, "district": district, "spaces": spaces, "gates": gates, "op": op}


def test_minutes_are_exact_sample_and_hold(conn: psycopg.Connection[Any], scene: dict) -> None:
    t0 = scene["t0"]
    rollups.recompute(conn, start=t0, end=t0 + 3 * M)
    lot1 = rows(conn, "lot", scene["spaces"])
    assert lot1[t0][0] == approx((1 * 10 + 0 * 20 + 1 * 15 + 2 * 15) / 60)
    assert lot1[t0][1:] == (2, 4, 2, 1)
    assert lot1[t0 + M][0] == approx(2) and lot1[t0 + M][1:] == (2, 4, 0, 0)
    lot2 = rows(conn, "lot", scene["gates"])
    assert lot2[t0][0] == approx((1 * 15 + 2 * 5 + 3 * 20 + 2 * 10 + 1 * 10) / 60)
    assert lot2[t0][1:] == (3, 3, 2, 2)
    assert lot2[t0 + M][0] == approx((1 * 10 + 2 * 10 + 3 * 40) / 60)
    assert lot2[t0 + M][1:] == (3, 3, 3, 1)
    assert lot2[t0 + 2 * M][0] == approx(3)
    district = rows(conn, "district", scene["district"])
    # the district's maximum is the maximum of the sum (4), not the sum of the maxima (5)
    assert district[t0][0] == approx(170 / 60)
    assert district[t0][1:] == (4, 7, 4, 3)
    fifteen = rows(conn, "lot", scene["gates"], "15m")
    minutes = [lot2[t0 + i * M][0] for i in range(3)]
    assert fifteen[t0][0] == approx(sum(float(m) for m in minutes) / 3)
    assert fifteen[t0][1:] == (3, 3, 5, 3)
    hour = rows(conn, "district", scene["district"], "1h")
    assert hour[t0][1:] == (5, 7, 7, 4)
    city = rows(conn, "city", "city")
    assert city[t0][2] >= 7


def test_the_snapshot_path_and_the_walk_back_agree(
    conn: psycopg.Connection[Any], scene: dict
) -> None:
    """A later count moves the gate lot's snapshot past the range; the minutes do not change."""
    t0 = scene["t0"]
    rollups.recompute(conn, start=t0 + M, end=t0 + 3 * M)
    before = rows(conn, "lot", scene["gates"])
    facts.ingest(conn, scene["op"], [facts.count(scene["gates"], {"standard": 0}, t0 + 5 * M)])
    conn.execute("DELETE FROM occupancy_buckets WHERE key = %s", (scene["gates"],))
    rollups.recompute(conn, start=t0 + M, end=t0 + 3 * M)
    assert rows(conn, "lot", scene["gates"]) == before


def test_recomputing_twice_or_over_garbage_gives_the_same_rows(
    conn: psycopg.Connection[Any], scene: dict
) -> None:
    t0 = scene["t0"]
    rollups.recompute(conn, start=t0 - 2 * M, end=t0 + 5 * M, chunk_minutes=2)
    first = {lv: rows(conn, lv, k, i) for lv, k in _keys(scene) for i in ("1m", "15m", "1h")}
    conn.execute(
        "UPDATE occupancy_buckets SET occupied_avg = 99, entries = 42 WHERE key = ANY(%s)",
        ([scene["spaces"], scene["gates"], scene["district"]],),
    )
    rollups.recompute(conn, start=t0 - 2 * M, end=t0 + 5 * M, chunk_minutes=3)
    second = {lv: rows(conn, lv, k, i) for lv, k in _keys(scene) for i in ("1m", "15m", "1h")}
    assert first == second


def _keys(scene: dict) -> list[tuple[str, str]]:
    return [("lot", scene["spaces"]), ("lot", scene["gates"]), ("district", scene["district"])]


def test_late_events_recompute_their_buckets(conn: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    district = f"d{uuid.uuid4().hex[:8]}"
    op = facts.operator(conn)
    lot_id = facts.lot(conn, op, district=district, spaces=2, created_at=now - timedelta(hours=2))
    late_minute = rollups.floor_to(now - 20 * M, M)
    rollups.rollup_recent(conn, lookback_minutes=3)
    rollups.recompute(conn, start=late_minute, end=late_minute + M)
    assert rows(conn, "lot", lot_id)[late_minute][1] == 0
    facts.ingest(conn, op, [facts.space(lot_id, "S-001", True, late_minute + 30 * S)])
    result = rollups.rollup_recent(conn, lookback_minutes=3)
    assert result["late_events"] >= 1
    got = rows(conn, "lot", lot_id)
    assert got[late_minute][0] == approx(0.5) and got[late_minute][1:] == (1, 2, 1, 0)
    # sample and hold: every later minute up to now holds the late event's state
    later = [got[m] for m in got if m > late_minute]
    assert len(later) >= 18 and all(r[:2] == (1, 1) for r in later)
    assert rows(conn, "district", district)[late_minute][1] == 1


def test_a_second_rollup_while_one_runs_steps_aside(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as other, rollups.rollup_lock(other):
        result = rollups.rollup_recent(conn, lock_wait_s=0.3)
    assert result == {"skipped": "another rollup is running"}
    assert "written" in rollups.rollup_recent(conn)
