"""A rollup killed with SIGKILL half way is delivered again and leaves the rows of a clean run.

Runs its own worker against its own database and Redis, so no other worker or beat can take
the task or touch the rows.
"""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery

from services.common.redis import celery_broker_url, connect
from services.worker import rollups
from tests.city import facts
from tests.stack import Stack, wait_for

LOTS = 20
HOURS = 12


def _rows(conn: psycopg.Connection[Any], start: datetime, end: datetime) -> list[tuple]:
    return conn.execute(
        "SELECT level, key, interval, bucket, occupied_avg, occupied_max, capacity, entries,"
        " exits FROM occupancy_buckets WHERE bucket >= %s AND bucket < %s"
        " ORDER BY level, key, interval, bucket",
        (start, end),
    ).fetchall()


def _count_1m(conn: psycopg.Connection[Any], start: datetime, end: datetime) -> int:
    row = conn.execute(
        "SELECT count(*) FROM occupancy_buckets WHERE level = 'lot' AND interval = '1m'"
        " AND bucket >= %s AND bucket < %s",
        (start, end),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_killed_rollup_is_redelivered_and_converges(
    isolated: tuple[str, str], tmp_path: Path
) -> None:
    database_url, redis_url = isolated
    start = rollups.floor_to(datetime.now(UTC) - timedelta(days=3), timedelta(hours=1))
    end = start + timedelta(hours=HOURS)
    expected = LOTS * HOURS * 60
    with psycopg.connect(database_url, autocommit=True) as conn:
        op = facts.operator(conn)
        events = []
        for n in range(LOTS):
            lot_id = facts.lot(
                conn,
                op,
                district=f"d{n % 3}",
                spaces=6,
                created_at=start - timedelta(hours=1),
            )
            for i in range(0, HOURS * 60, 7 + n % 5):
                at = start + timedelta(minutes=i, seconds=(i * 13 + n) % 60)
                events.append(facts.space(lot_id, f"S-00{i % 6}", (i // 7 + n) % 3 != 0, at))
        facts.ingest(conn, op, events)
        # garbage from an earlier, wrong computation must be overwritten, not kept
        conn.execute(
            "INSERT INTO occupancy_buckets (level, key, interval, bucket, occupied_avg,"
            " occupied_max, capacity, entries, exits) VALUES ('city', 'city', '1m', %s, 999,"
            " 999, 1, 999, 999)",
            (end - timedelta(minutes=1),),
        )

        stack = Stack(
            database_url,
            redis_url,
            tmp_path / "stack",
            env_overrides={"PARKING_WORKER_VISIBILITY_TIMEOUT_S": "5"},
            names=("worker",),
        )
        broker: redis.Redis = connect(redis_url, 5.0)
        try:
            stack.start("worker")
            sender = Celery("tests", broker=celery_broker_url(redis_url))
            sender.send_task(
                "services.worker.tasks.rollup_range",
                args=[start.isoformat(), end.isoformat()],
                queue="parking",
                task_id=str(uuid.uuid4()),
            )
            wait_for(
                lambda: 0 < _count_1m(conn, start, end) < expected // 2,
                timeout=120,
                interval=0.02,
                what="the rollup to be half way",
            )
            stack.signal("worker", signal.SIGKILL)
            stack.procs["worker"].wait(10)
            stack.procs.pop("worker")
            killed_at = _count_1m(conn, start, end)
            assert 0 < killed_at < expected, "the worker died in the middle of the task"
            assert broker.hlen("unacked") == 1, "the broker still holds the unacknowledged task"

            stack.start("worker")
            wait_for(
                lambda: (
                    _count_1m(conn, start, end) == expected
                    and broker.hlen("unacked") == 0
                    and broker.llen("parking") == 0
                    and '"message": "rollup range"' in stack.log("worker")
                ),
                timeout=180,
                interval=0.2,
                what="the redelivered rollup to finish",
            )
            after_redelivery = _rows(conn, start, end)
            # and once more, a second complete run by the worker: the same rows again
            sender.send_task(
                "services.worker.tasks.rollup_range",
                args=[start.isoformat(), end.isoformat()],
                queue="parking",
            )
            wait_for(
                lambda: (
                    stack.log("worker").count('"message": "rollup range"') == 2
                    and broker.hlen("unacked") == 0
                ),
                timeout=180,
                interval=0.2,
                what="the second rollup to finish",
            )
            assert _rows(conn, start, end) == after_redelivery
        finally:
            stack.stop()
        log = stack.log("worker")
        assert log.count("Task services.worker.tasks.rollup_range[") >= 3  # received thrice
        rollups.recompute(conn, start=start, end=end)
        assert after_redelivery == _rows(conn, start, end)
        assert len({r[3] for r in after_redelivery if r[:3] == ("city", "city", "1m")}) == (
            HOURS * 60
        )
        assert all(r[4] != 999 for r in after_redelivery)
