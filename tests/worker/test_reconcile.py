"""Reconciliation against the real PostgreSQL and Redis, directly and through the real worker."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from prometheus_client import REGISTRY

from services.common import livestate
from services.common.redis import celery_broker_url
from services.ingestion import registry
from services.worker import reconcile
from tests.city import facts
from tests.stack import Stack, wait_for

S = timedelta(seconds=1)


def _scene(conn: psycopg.Connection[Any], client: redis.Redis) -> dict[str, Any]:
    op = facts.operator(conn)
    district = f"d{uuid.uuid4().hex[:8]}"
    lots = [facts.lot(conn, op, district=district, spaces=3, client=client) for _ in range(3)]
    now = datetime.now(UTC)
    facts.ingest(
        conn,
        op,
        [facts.space(lot_id, "S-000", True, now) for lot_id in lots]
        + [facts.space(lots[0], "S-001", True, now)],
        client=client,
    )
    return {"op": op, "district": district, "lots": lots}


def _consistent(conn: psycopg.Connection[Any], client: redis.Redis, scene: dict) -> bool:
    """Redis holds PostgreSQL's counts for the lots, and totals equal to the sum of lots."""
    pg = {s.lot_id: s for s in registry.live_states(conn)}
    for lot_id in scene["lots"]:
        held = livestate.read_state(client, lot_id)
        if held is None or held["occupied"] != dict(pg[lot_id].occupied):
            return False
    district = client.hgetall(livestate.district_key(scene["district"]))
    mine = [pg[i] for i in scene["lots"]]
    if int(district.get("o", -1)) != sum(sum(s.occupied.values()) for s in mine):
        return False
    city = client.hgetall(livestate.CITY_KEY)
    if "ghost" in scene and client.exists(livestate.lot_key(scene["ghost"])):
        return False
    return int(city.get("o", -1)) == sum(sum(s.occupied.values()) for s in pg.values())


def _corrupt(client: redis.Redis, scene: dict) -> None:
    a, b, c = scene["lots"]
    client.hset(livestate.lot_key(a), "o:standard", 3)  # same version, wrong count
    client.delete(livestate.lot_key(b))  # lost
    client.hset(livestate.lot_key(c), mapping={"v": 10**9, "o:standard": 0})  # bogus version
    client.hincrby(livestate.district_key(scene["district"]), "o", 40)
    client.hincrby(livestate.CITY_KEY, "c", -7)
    ghost = str(uuid.uuid4())  # a lot PostgreSQL does not have
    livestate.put_meta(client, ghost, {"location": {"lat": 30.1, "lon": 120.1}})
    livestate.apply_states(
        client,
        [livestate.LotState(ghost, 1, None, scene["district"], {"standard": 1}, {"standard": 1})],
    )
    scene["ghost"] = ghost


def test_reconcile_repairs_redis_from_postgresql(
    conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    scene = _scene(conn, redis_client)
    reconcile.reconcile(conn, redis_client)  # lots other tests left out of Redis come in
    assert _consistent(conn, redis_client, scene)
    _corrupt(redis_client, scene)
    assert not _consistent(conn, redis_client, scene)
    reconcile.reconcile(conn, redis_client)
    assert _consistent(conn, redis_client, scene)
    held = livestate.read_state(redis_client, scene["lots"][2])
    assert held is not None and held["version"] > 10**9
    again = reconcile.reconcile(conn, redis_client)
    assert (again["missing"], again["behind"], again["bumped"], again["totals"]) == (0, 0, 0, 0)
    assert again["removed"] == 0


def test_stored_counts_are_checked_against_the_log(
    conn: psycopg.Connection[Any], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    scene = _scene(conn, redis_client)
    lot_id = scene["lots"][0]
    conn.execute("UPDATE lot_occupancy SET occupied = 0 WHERE lot_id = %s", (lot_id,))
    try:
        with caplog.at_level(logging.ERROR, logger="parking.worker.reconcile"):
            result = reconcile.reconcile(conn, redis_client)
        assert result["pg_mismatches"] >= 1
        assert any(getattr(r, "lot_id", None) == lot_id for r in caplog.records)
    finally:
        conn.execute("UPDATE lot_occupancy SET occupied = 2 WHERE lot_id = %s", (lot_id,))
        registry.sync_lots_to_redis(conn, redis_client, lot_ids=[lot_id])


def test_gate_drift_is_reported_per_lot(
    conn: psycopg.Connection[Any], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    op = facts.operator(conn)
    district = f"d{uuid.uuid4().hex[:8]}"
    drifting = facts.lot(conn, op, district=district, capacity={"standard": 20})
    exact = facts.lot(conn, op, district=district, capacity={"standard": 20})
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    facts.ingest(
        conn,
        op,
        [
            facts.count(drifting, {"standard": 5}, t0),
            *(facts.gate(drifting, "entry", t0 + i * S) for i in (1, 2, 3)),
            facts.count(drifting, {"standard": 7}, t0 + 10 * S),  # gates said 8
            facts.count(exact, {"standard": 5}, t0),
            facts.gate(exact, "entry", t0 + S),
            facts.gate(exact, "exit", t0 + 2 * S),
            facts.gate(exact, "entry", t0 + 3 * S),
            facts.count(exact, {"standard": 6}, t0 + 10 * S),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="parking.worker.reconcile"):
        result = reconcile.reconcile(conn, redis_client)
    assert {"lot_id": drifting, "space_type": "standard", "drift": -1} in result["drifting"]
    assert all(d["lot_id"] != exact for d in result["drifting"])
    lines = [r for r in caplog.records if r.getMessage() == "gate count drift"]
    assert [(r.lot_id, r.drift) for r in lines if r.lot_id in (drifting, exact)] == [  # type: ignore[attr-defined]
        (drifting, -1)
    ]
    gauge = "parking_gate_drift"
    assert REGISTRY.get_sample_value(gauge, {"lot_id": drifting, "space_type": "standard"}) == -1
    assert REGISTRY.get_sample_value(gauge, {"lot_id": exact, "space_type": "standard"}) == 0


def test_the_worker_runs_the_reconciliation(
    stack: Stack, conn: psycopg.Connection[Any], redis_client: redis.Redis, redis_url: str
) -> None:
    scene = _scene(conn, redis_client)
    _corrupt(redis_client, scene)
    sender = Celery("tests", broker=celery_broker_url(redis_url))
    sender.send_task("services.worker.tasks.reconcile", queue="parking")
    wait_for(
        lambda: _consistent(conn, redis_client, scene),
        timeout=60,
        interval=0.2,
        what="the worker's reconciliation",
    )


def test_gate_lots_past_event_retention_are_not_checked(
    conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    op = facts.operator(conn)
    old = datetime.now(UTC) - timedelta(days=200)
    lot_id = facts.lot(
        conn, op, district=f"d{uuid.uuid4().hex[:8]}", capacity={"standard": 9}, created_at=old
    )
    # its events are gone with their partitions; the stored count is all that is left
    conn.execute(
        "UPDATE lot_occupancy SET occupied = 4, gate_delta = 4 WHERE lot_id = %s", (lot_id,)
    )
    flagged = reconcile.recompute_counts(conn)
    assert any(m["lot_id"] == lot_id for m in flagged)
    retained = reconcile.recompute_counts(
        conn, retained_since=datetime.now(UTC) - timedelta(days=90)
    )
    assert all(m["lot_id"] != lot_id for m in retained)
    conn.execute(
        "UPDATE lot_occupancy SET occupied = 0, gate_delta = 0 WHERE lot_id = %s", (lot_id,)
    )
