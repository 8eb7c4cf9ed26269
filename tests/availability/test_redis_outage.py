"""The same answers when Redis is flushed or down, and Redis refilling itself afterwards; and
stream heartbeats (made quick in this stack).

A stack of its own (gateway + availability) runs against a redis-server that this test flushes,
stops and starts again; the session's Redis stays up for the other tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
import requests

from services.availability.readpath import GEO_COMPLETE_KEY
from services.common import livestate
from services.common.redis import connect
from tests.availability import facts
from tests.stack import RedisServer, Stack, wait_for

# the processes ``own_stack`` runs, and their environment
OWN_STACK = ("gateway", "availability")
OWN_STACK_ENV = {"PARKING_AVAILABILITY_STREAM_HEARTBEAT_S": "0.3"}


def test_answers_survive_a_flush_and_a_restart_of_redis(
    own_stack: Stack,
    own_redis: RedisServer,
    conn: psycopg.Connection[Any],
    operator_id: str,
) -> None:
    client = connect(own_redis.url, 2.0)
    lat, lon = facts.somewhere()
    lots = []
    for n, north in enumerate((150, 450, 900)):
        plat, plon = facts.offset(lat, lon, north, 40 * n)
        lot_id = facts.lot(
            conn, operator_id, lat=plat, lon=plon, capacity={"standard": 8, "ev": 2}, client=client
        )
        facts.set_occupied(conn, client, lot_id, {"standard": 2 + n, "ev": 1})
        lots.append(lot_id)
    now = datetime.now(UTC)
    facts.reservation(
        conn, lots[0], "standard", now - timedelta(minutes=1), now + timedelta(hours=1)
    )

    service = own_stack.service_url("availability")
    paths = [f"/v1/lots/{i}" for i in lots] + [
        f"/v1/lots?lat={lat}&lon={lon}&radius_m=2000",
        f"/v1/lots?lat={lat}&lon={lon}&radius_m=2000&limit=2",
        f"/v1/lots?lat={lat}&lon={lon}&radius_m=600&space_type=ev",
    ]

    def answers() -> list[Any]:
        out = []
        for path in paths:
            resp = requests.get(service + path, timeout=5)
            assert resp.status_code == 200, (path, resp.text)
            out.append(resp.json())
        return out

    def refilled() -> bool:
        return bool(client.exists(GEO_COMPLETE_KEY)) and all(
            client.exists(livestate.lot_key(i), livestate.meta_key(i)) == 2 for i in lots
        )

    # the first search finds no vouched geo index: PostgreSQL answers and a refill starts
    first = answers()
    wait_for(refilled, timeout=30, what="the first refill")
    expected = answers()
    assert expected == first
    assert [len(a["items"]) for a in expected[3:]] == [3, 2, 2]
    assert expected[0]["reserved"] == {"ev": 0, "standard": 1}
    via_gateway = requests.get(own_stack.url + paths[0], timeout=5)
    assert via_gateway.json() == expected[0]

    client.flushall()
    assert answers() == expected  # from PostgreSQL
    wait_for(refilled, timeout=30, what="the refill after a flush")
    assert answers() == expected  # from Redis again

    own_redis.stop()
    assert answers() == expected  # Redis down: from PostgreSQL
    assert answers() == expected

    own_redis.start()  # back, empty
    assert answers() == expected
    wait_for(refilled, timeout=30, what="the refill after a restart")
    assert answers() == expected

    # the stream's subscription came back too: a change is pushed again
    with facts.event_stream(f"{service}/v1/lots/{lots[1]}/stream") as events:
        events.next_event()
        for _ in range(100):  # the hub resubscribes within ~2 s of Redis coming back
            version = facts.set_occupied(conn, client, lots[1], {"standard": 7})
            try:
                event = events.next_event(timeout=0.5)
            except TimeoutError:
                continue
            if int(event["id"]) == version:
                break
        else:
            pytest.fail("no push after Redis came back")
        assert orjson.loads(event["data"])["occupied"]["standard"] == 7


def test_idle_streams_get_heartbeats_through_the_gateway(
    own_stack: Stack, own_redis: RedisServer, conn: psycopg.Connection[Any], operator_id: str
) -> None:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon, client=connect(own_redis.url, 2.0))
    with facts.event_stream(f"{own_stack.url}/v1/lots/{lot_id}/stream") as events:
        assert events.next_event()["event"] == "lot"
        for _ in range(3):
            beat = events.next_event(timeout=2, comments=True)
            assert "data" not in beat and beat["_comments"].startswith(": keep-alive")
