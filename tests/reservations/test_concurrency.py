"""Capacity and idempotency under concurrency: hundreds of requests at once through the gateway.

A stack of its own with several reservations workers (each its own process and pool, like
replicas), so the requests really meet in PostgreSQL at the same time.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.reservations.helpers import hour, iso, mint_drivers
from tests.stack import Client, Stack

pytestmark = pytest.mark.e2e
QUOTA = 10


@pytest.fixture(scope="module")
def busy_stack(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = Stack(
        database_url,
        redis_url,
        Path(tmp_path_factory.mktemp("busy-stack")),
        env_overrides={
            "RESERVATIONS_WORKERS": "4",
            "GUNICORN_WORKER_CLASS": "gthread",
            "GUNICORN_THREADS": "4",
            "PARKING_DB_POOL_MAX": "4",
        },
    )
    stack.names = ("gateway", "reservations")
    with stack:
        yield stack


def fire(requests_: list[tuple[Client, dict[str, Any], str]]) -> list[requests.Response]:
    """Send every request at once, one thread each, released together; bounded in time."""
    go = threading.Event()

    def send(item: tuple[Client, dict[str, Any], str]) -> requests.Response:
        client, body, key = item
        go.wait(60)
        return requests.post(
            client.base + "/v1/reservations",
            json=body,
            headers={
                "Authorization": client.session.headers["Authorization"],
                "Idempotency-Key": key,
            },
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=len(requests_)) as pool:
        futures = [pool.submit(send, item) for item in requests_]
        go.set()
        return [f.result(timeout=180) for f in futures]


def peak(windows: list[tuple[datetime, datetime]]) -> int:
    """The most windows covering one instant (half-open windows)."""
    edges = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows])
    running = best = 0
    for _, delta in edges:
        running += delta
        best = max(best, running)
    return best


def test_concurrent_reservations_never_overbook(
    busy_stack: Stack, conn: psycopg.Connection[Any], make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": QUOTA}, capacity={"standard": 40})
    drivers = mint_drivers(busy_stack, conn, 60)
    rng = random.Random(5)
    work: list[tuple[Client, dict[str, Any], str]] = []
    for i in range(240):
        if i % 6 == 0:  # far apart: never contended
            start = hour(30 + i)
            end = start + timedelta(minutes=45)
        else:  # crowded into six hours
            start = hour(0) + timedelta(minutes=15 * rng.randrange(0, 20))
            end = start + timedelta(minutes=15 * rng.randrange(1, 9))
        body = {
            "lot_id": lot,
            "space_type": "standard",
            "start": iso(start),
            "end": iso(end),
            "plate": f"浙A{i:05d}",
        }
        work.append((drivers[i % len(drivers)], body, uuid.uuid4().hex))

    answers = fire(work)

    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {201, 409}, {s for s in statuses if s not in (201, 409)}
    created = {r.json()["id"]: r.json() for r in answers if r.status_code == 201}
    assert 40 <= len(created) < 240, len(created)
    assert {r.json()["code"] for r in answers if r.status_code == 409} == {"no-capacity"}

    # At no instant more than QUOTA confirmed, checked by SQL at every start instant.
    row = conn.execute(
        "SELECT max((SELECT count(*) FROM reservations o WHERE o.lot_id = r.lot_id"
        "  AND o.space_type = r.space_type AND o.status = 'confirmed'"
        "  AND o.starts_at <= r.starts_at AND o.ends_at > r.starts_at)),"
        " count(*) FROM reservations r WHERE r.lot_id = %s AND r.status = 'confirmed'",
        (lot,),
    ).fetchone()
    assert row is not None
    assert row[0] <= QUOTA and row[0] == QUOTA  # full at some instant, never over
    # Every 201 answer exists as answered, and nothing else was made.
    stored = {
        str(r[0]): (r[1], r[2])
        for r in conn.execute(
            "SELECT id, starts_at, ends_at FROM reservations WHERE lot_id = %s AND status ="
            " 'confirmed'",
            (lot,),
        ).fetchall()
    }
    assert set(stored) == set(created) and row[1] == len(created)
    for rid, body in created.items():
        assert stored[rid] == (
            datetime.fromisoformat(body["start"]),
            datetime.fromisoformat(body["end"]),
        )
    # And a refusal was right: the window would overbook even against the final set (which
    # only grew after it was refused).
    final = list(stored.values())
    for (_, body, _), answer in zip(work, answers, strict=True):
        if answer.status_code == 409:
            window = (datetime.fromisoformat(body["start"]), datetime.fromisoformat(body["end"]))
            clipped = [
                (max(s, window[0]), min(e, window[1]))
                for s, e in final
                if s < window[1] and e > window[0]
            ]
            assert peak(clipped) + 1 > QUOTA, body


def test_concurrent_duplicates_make_exactly_one_reservation(
    busy_stack: Stack, conn: psycopg.Connection[Any], make_lot: Callable[..., str]
) -> None:
    lot = make_lot(reservable={"standard": QUOTA})
    (driver,) = mint_drivers(busy_stack, conn, 1)
    body = {
        "lot_id": lot,
        "space_type": "standard",
        "start": iso(hour(1)),
        "end": iso(hour(2)),
        "plate": "浙A00001",
    }
    key = uuid.uuid4().hex
    answers = fire([(driver, body, key)] * 50)
    assert [r.status_code for r in answers] == [201] * 50
    assert len({r.json()["id"] for r in answers}) == 1
    assert len({r.content for r in answers}) == 1
    row = conn.execute("SELECT count(*) FROM reservations WHERE lot_id = %s", (lot,)).fetchone()
    assert row == (1,)
    keys = conn.execute(
        "SELECT count(*), min(status) FROM idempotency_keys WHERE key = %s", (key,)
    ).fetchone()
    assert keys == (1, 201)
