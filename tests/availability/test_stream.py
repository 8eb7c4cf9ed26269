"""GET /v1/lots/{id}/stream through the gateway: pushes, reconnects, and the worker model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import psycopg
import redis
import requests

from services.common import livestate
from tests.availability import facts
from tests.stack import Client, Stack, wait_for


def test_each_change_is_pushed_within_200_ms(
    stack: Stack, conn: psycopg.Connection[Any], redis_client: redis.Redis, operator_id: str
) -> None:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    version = facts.set_occupied(conn, redis_client, lot_id, {"standard": 1})
    with facts.event_stream(f"{stack.url}/v1/lots/{lot_id}/stream") as events:
        assert events.status == 200
        assert events.response.getheader("Content-Type", "").startswith("text/event-stream")
        first = events.next_event()
        assert first["event"] == "lot" and int(first["id"]) == version
        assert orjson.loads(first["data"])["occupied"] == {"standard": 1}
        delays = []
        for n in range(2, 7):
            started = time.monotonic()
            version = facts.set_occupied(conn, redis_client, lot_id, {"standard": n})
            event = events.next_event(timeout=2)
            delays.append(time.monotonic() - started)
            assert int(event["id"]) == version
            body = orjson.loads(event["data"])
            assert body["occupied"] == {"standard": n} and body["free"] == {"standard": 10 - n}
        # the commit above takes part of each delay; the push itself is what must be quick
        assert max(delays) < 0.2, delays


def test_a_reconnect_resumes_from_last_event_id(
    stack: Stack, conn: psycopg.Connection[Any], redis_client: redis.Redis, operator_id: str
) -> None:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    version = facts.set_occupied(conn, redis_client, lot_id, {"standard": 2})
    url = f"{stack.url}/v1/lots/{lot_id}/stream"
    # up to date: nothing until the next change, which comes first
    with facts.event_stream(url, {"Last-Event-ID": str(version)}) as events:
        newer = facts.set_occupied(conn, redis_client, lot_id, {"standard": 3})
        event = events.next_event()
        assert int(event["id"]) == newer
        assert orjson.loads(event["data"])["occupied"] == {"standard": 3}
    # missed a change while away: the current state at once
    missed = facts.set_occupied(conn, redis_client, lot_id, {"standard": 4})
    with facts.event_stream(url, {"Last-Event-ID": str(newer)}) as events:
        event = events.next_event(timeout=2)
        assert int(event["id"]) == missed
        assert orjson.loads(event["data"])["occupied"] == {"standard": 4}
    # a nonsense id is ignored: the current state
    with facts.event_stream(url, {"Last-Event-ID": "banana"}) as events:
        assert int(events.next_event(timeout=2)["id"]) == missed


def test_stream_of_unknown_lot_is_404_and_deletion_ends_the_stream(
    stack: Stack,
    anonymous: Client,
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    operator_id: str,
) -> None:
    resp = anonymous.get("/v1/lots/00000000-0000-0000-0000-000000000000/stream")
    assert resp.status_code == 404 and resp.json()["code"] == "not-found"
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    with facts.event_stream(f"{stack.url}/v1/lots/{lot_id}/stream") as events:
        events.next_event()
        conn.execute("UPDATE lots SET deleted_at = now() WHERE id = %s", (lot_id,))
        livestate.remove_lot(redis_client, lot_id)
        assert events.next_event()["event"] == "deleted"


def test_many_watchers_share_one_redis_subscription_and_other_requests_stay_fast(
    stack: Stack,
    anonymous: Client,
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    operator_id: str,
) -> None:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    facts.set_occupied(conn, redis_client, lot_id, {"standard": 1})

    def subscribers() -> int:
        counts = redis_client.pubsub_numsub(livestate.CHANGES_CHANNEL)
        return int(counts[0][1])

    before = subscribers()
    url = f"{stack.url}/v1/lots/{lot_id}/stream"
    streams = []
    try:
        for _ in range(50):  # more than the gateway's and the service's worker count
            s = facts.EventStream(url)
            streams.append(s)
            s.next_event()
        assert subscribers() == before  # no Redis connection per client
        started = time.monotonic()
        for _ in range(20):
            assert anonymous.get(f"/v1/lots/{lot_id}").status_code == 200
        assert time.monotonic() - started < 2.0
        version = facts.set_occupied(conn, redis_client, lot_id, {"standard": 5})
        for s in streams:
            assert int(s.next_event(timeout=3)["id"]) == version
    finally:
        for s in streams:
            s.close()


def test_postgresql_waits_do_not_block_the_gevent_worker(
    stack: Stack,
    database_url: str,
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    operator_id: str,
) -> None:
    """psycopg under gevent's monkey-patching: a request blocked in PostgreSQL parks only its
    greenlet, so the single availability worker keeps answering others."""
    lat, lon = facts.somewhere()
    blocked = facts.lot(conn, operator_id, lat=lat, lon=lon)  # not in Redis: read from PostgreSQL
    cached = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    service = stack.service_url("availability")
    with psycopg.connect(database_url) as locker:
        locker.execute("LOCK TABLE lot_live IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.get, f"{service}/v1/lots/{blocked}", timeout=10)
            wait_for(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND application_name = 'availability'"
                    ).fetchone()[0]
                    >= 1
                ),
                timeout=10,
                what="the request to wait on the lock",
            )
            started = time.monotonic()
            for _ in range(10):
                assert requests.get(f"{service}/v1/lots/{cached}", timeout=5).status_code == 200
            assert time.monotonic() - started < 2.0
            assert not slow.done()
            locker.rollback()
            assert slow.result(timeout=10).status_code == 200


def test_a_client_that_goes_away_leaves_no_subscriber_behind(
    stack: Stack, conn: psycopg.Connection[Any], redis_client: redis.Redis, operator_id: str
) -> None:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=redis_client)
    url = f"{stack.url}/v1/lots/{lot_id}/stream"
    s = facts.EventStream(url)
    s.next_event()
    s.close()
    # the gateway's connection to the service must not be reused while the stream still runs
    done = threading.Event()
    results: list[int] = []

    def hammer() -> None:
        for _ in range(40):
            results.append(requests.get(f"{stack.url}/v1/lots/{lot_id}", timeout=5).status_code)
        done.set()

    t = threading.Thread(target=hammer)
    t.start()
    t.join(30)
    assert done.is_set() and set(results) == {200}
