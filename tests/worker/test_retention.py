"""Retention on a database of its own: event partitions ahead and dropped, buckets pruned."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.worker import maintenance
from tests.city import facts
from tests.stack import create_database, drop_database


@pytest.fixture
def own_db(servers: tuple[str, str]) -> Iterator[psycopg.Connection[Any]]:
    url = create_database(servers[0])
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
    finally:
        drop_database(servers[0], url)


def _partitions(conn: psycopg.Connection[Any]) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'events'::regclass"
        )
    }


def test_event_partitions_are_made_ahead_and_dropped_past_retention(
    own_db: psycopg.Connection[Any],
) -> None:
    conn = own_db
    today = datetime.now(UTC).date()
    later = today + timedelta(days=20)
    op = facts.operator(conn)
    lot_id = facts.lot(conn, op, district="retention", spaces=1)
    old_day = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    kept_day = datetime.combine(later - timedelta(days=1), datetime.min.time(), UTC)
    facts.ingest(conn, op, [facts.space(lot_id, "S-000", True, old_day + timedelta(hours=1))])
    facts.ingest(conn, op, [facts.space(lot_id, "S-000", False, kept_day + timedelta(hours=1))])
    assert f"events_{(today + timedelta(days=1)):%Y%m%d}" in _partitions(conn)

    result = maintenance.maintain_partitions(conn, ahead_days=5, retention_days=3, today=later)
    names = _partitions(conn)
    assert result["created"] >= 6
    for offset in range(6):  # today and five days ahead
        assert f"events_{(later + timedelta(days=offset)):%Y%m%d}" in names
    assert not any(
        n.startswith("events_2")
        and date(int(n[7:11]), int(n[11:13]), int(n[13:15])) < later - timedelta(days=3)
        for n in names
    )
    observed = [r[0] for r in conn.execute("SELECT observed_at FROM events ORDER BY 1")]
    assert observed == [kept_day + timedelta(hours=1)]
    again = maintenance.maintain_partitions(conn, ahead_days=5, retention_days=3, today=later)
    assert again == {"created": 0, "dropped": 0}


def test_buckets_are_kept_per_interval(own_db: psycopg.Connection[Any]) -> None:
    conn = own_db
    now = datetime(2026, 6, 1, tzinfo=UTC)
    ages = {"1m": [1, 6, 8, 30], "15m": [30, 89, 91], "1h": [400, 729, 731]}
    for interval, days in ages.items():
        for d in days:
            conn.execute(
                "INSERT INTO occupancy_buckets (level, key, interval, bucket, occupied_avg,"
                " occupied_max, capacity) VALUES ('city', 'city', %s, %s, 1, 1, 1)",
                (interval, now - timedelta(days=d)),
            )
    keep = {"1m": timedelta(days=7), "15m": timedelta(days=90), "1h": timedelta(days=730)}
    deleted = maintenance.prune_buckets(conn, now=now, keep=keep, batch=1)
    assert deleted == {"1m": 2, "15m": 1, "1h": 1}
    left = {
        (r[0], (now - r[1]).days)
        for r in conn.execute("SELECT interval, bucket FROM occupancy_buckets")
    }
    assert left == {("1m", 1), ("1m", 6), ("15m", 30), ("15m", 89), ("1h", 400), ("1h", 729)}
    assert maintenance.prune_buckets(conn, now=now, keep=keep) == {"1m": 0, "15m": 0, "1h": 0}


def test_finished_webhook_deliveries_are_pruned(own_db: psycopg.Connection[Any]) -> None:
    conn = own_db
    row = conn.execute("INSERT INTO city_clients (name) VALUES ('c') RETURNING id").fetchone()
    assert row is not None
    sub = conn.execute(
        "INSERT INTO city_subscriptions (city_client_id, url, events, secret)"
        " VALUES (%s, 'http://127.0.0.1:9/', ARRAY['lot.full'], 'x') RETURNING id",
        (row[0],),
    ).fetchone()
    assert sub is not None
    now = datetime.now(UTC)
    for key, status, age in (("a", "delivered", 40), ("b", "failed", 40), ("c", "pending", 40)):
        conn.execute(
            "INSERT INTO webhook_deliveries (subscription_id, event, dedupe_key, payload, status,"
            " created_at) VALUES (%s, 'lot.full', %s, '{}', %s, %s)",
            (sub[0], key, status, now - timedelta(days=age)),
        )
    assert maintenance.prune_deliveries(conn, now=now, keep=timedelta(days=30)) == 2
    left = [r[0] for r in conn.execute("SELECT dedupe_key FROM webhook_deliveries")]
    assert left == ["c"]
