"""Partition maintenance and retention of the event log."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

_PARTITION = re.compile(r"^events_(\d{8})$")


def maintain_partitions(
    conn: psycopg.Connection[Any],
    *,
    ahead_days: int,
    retention_days: int,
    today: date | None = None,
) -> dict[str, int]:
    """Create daily partitions for today and ``ahead_days`` after; drop those past retention."""
    today = today or datetime.now(UTC).date()
    row = conn.execute("SELECT ensure_event_partitions(%s, %s)", (today, ahead_days + 1)).fetchone()
    created = int(row[0]) if row else 0
    cutoff = today - timedelta(days=retention_days)
    names = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'events'::regclass"
        ).fetchall()
    ]
    dropped = 0
    for name in names:
        m = _PARTITION.match(name)
        if m and datetime.strptime(m.group(1), "%Y%m%d").date() < cutoff:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            dropped += 1
    conn.execute(
        "DELETE FROM events_default WHERE observed_at < %s",
        (datetime.combine(cutoff, datetime.min.time(), UTC),),
    )
    conn.execute(
        "DELETE FROM event_ids WHERE received_at < %s",
        (datetime.combine(cutoff, datetime.min.time(), UTC),),
    )
    return {"created": created, "dropped": dropped}


def prune_buckets(
    conn: psycopg.Connection[Any],
    *,
    now: datetime,
    keep: dict[str, timedelta],
    batch: int = 50_000,
) -> dict[str, int]:
    """Delete buckets older than their interval's retention (``keep``: interval -> age)."""
    deleted: dict[str, int] = {}
    for interval, age in keep.items():
        total = 0
        for _ in range(1000):  # bounded: a batch at a time keeps each transaction short
            cur = conn.execute(
                "DELETE FROM occupancy_buckets WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM occupancy_buckets WHERE interval = %s AND bucket < %s"
                " LIMIT %s))",
                (interval, now - age, batch),
            )
            total += cur.rowcount
            if cur.rowcount < batch:
                break
        deleted[interval] = total
    return deleted


def prune_deliveries(conn: psycopg.Connection[Any], *, now: datetime, keep: timedelta) -> int:
    """Delete finished webhook deliveries older than ``keep`` from the delivery log."""
    cur = conn.execute(
        "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND created_at < %s",
        (now - keep,),
    )
    return cur.rowcount
