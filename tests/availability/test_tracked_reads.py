"""Searches that take lots Redis vouches for (client-side caching, ``CLIENT TRACKING``) from
the availability worker's cache, never a changed one: through the gateway, a lot's change by
ingestion, a reservation made or starting, a flush of Redis and a killed tracked connection are
each seen by the very next search.

A stack of its own (gateway, ingestion, availability with one worker, reservations) runs
against a redis-server of the test's own, which it flushes and whose connections it kills.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis

from services.availability.readpath import GEO_COMPLETE_KEY
from services.common.redis import connect
from tests.availability import facts
from tests.reservations.helpers import mint_drivers, reserve
from tests.stack import Client, RedisServer, Stack, wait_for

# the processes ``own_stack`` runs (one availability worker: the Procfile's)
OWN_STACK = ("gateway", "ingestion", "availability", "reservations")


def _calls(client: redis.Redis) -> tuple[int, int, int, int]:
    """How many times Redis has been asked whether the geo index is complete (every search
    from Redis asks), for a geo search, for a lot's state (``lot:`` hashes and the
    ``reserved:`` ones read with them), and for a PONG (a lot detail from the cache asks)."""
    stats = client.info("commandstats")
    return tuple(  # type: ignore[return-value]
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("exists", "geosearch", "hgetall", "ping")
    )


def _tracked(client: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in client.client_list() if "t" in c["flags"]]


def test_searches_and_details_see_every_change_of_a_lot_they_take_from_the_cache(
    own_stack: Stack, own_redis: RedisServer, conn: psycopg.Connection[Any]
) -> None:
    client = connect(own_redis.url, 2.0)
    admin = Client(own_stack.url, own_stack.admin_key)
    made = admin.post("/v1/admin/operators", json={"name": "tracked reads"})
    assert made.status_code == 201, made.text
    operator = Client(own_stack.url, made.json()["api_key"])
    anonymous = Client(own_stack.url)
    lat, lon = facts.somewhere()

    def new_lot(name: str, lat: float, lon: float) -> str:
        resp = operator.post(
            "/v1/lots",
            json={
                "name": name,
                "location": {"lat": lat, "lon": lon},
                "district": "xihu",
                "opening_hours": "24/7",
                "capacity": {"standard": 10},
                "reservable": {"standard": 3},
                "tariff": facts.TARIFF,
            },
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    lot_id = new_lot("Tracked P1", lat, lon)
    far = facts.offset(lat, lon, 2000)
    other_id = new_lot("Tracked P2", *far)  # out of the searches' radius
    (driver,) = mint_drivers(own_stack, conn, 1)

    def found(lot_id: str = lot_id, near: tuple[float, float] = (lat, lon)) -> dict[str, Any]:
        """The lot as the next search through the gateway finds it."""
        params = {"lat": near[0], "lon": near[1], "radius_m": 200}
        resp = anonymous.get("/v1/lots", params=params)
        assert resp.status_code == 200, resp.text
        items = [i for i in resp.json()["items"] if i["id"] == lot_id]
        assert len(items) == 1, resp.json()
        item: dict[str, Any] = items[0]
        assert item["free"]["standard"] == max(
            0, 10 - item["occupied"]["standard"] - item["reserved"]["standard"]
        )
        return item

    def ids_near(lat: float, lon: float) -> list[str]:
        resp = anonymous.get("/v1/lots", params={"lat": lat, "lon": lon, "radius_m": 200})
        assert resp.status_code == 200, resp.text
        return [i["id"] for i in resp.json()["items"]]

    def detail(lot_id: str = lot_id) -> dict[str, Any]:
        resp = anonymous.get(f"/v1/lots/{lot_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def counts() -> tuple[int, int]:
        """The lot's occupied and reserved counts as the very next lot detail answers them,
        and then the very next search (a detail after a change reads no lot the search read
        after it)."""
        shown = detail()
        item = found()
        seen = item["occupied"]["standard"], item["reserved"]["standard"]
        assert (shown["occupied"]["standard"], shown["reserved"]["standard"]) == seen
        return seen

    def served_from_cache(*where: Any) -> bool:
        """A search answered with Redis' vouching, from the worker's copies of the geo index
        and of the lots (no GEOSEARCH, no lot read)."""
        asked, searched, read, _ = _calls(client)
        found(*where)
        now_asked, now_searched, now_read, _ = _calls(client)
        return now_asked > asked and (now_searched, now_read) == (searched, read)

    def detail_from_cache(lot_id: str = lot_id) -> bool:
        """A lot detail answered from the worker's copy, after a PING (no lot read)."""
        _, _, read, pinged = _calls(client)
        detail(lot_id)
        _, _, now_read, now_pinged = _calls(client)
        return now_pinged > pinged and now_read == read

    def entries(*ids: str) -> None:
        at = datetime.now(UTC) - timedelta(seconds=5)
        events = [
            {
                "id": event_id,
                "lot_id": lot_id,
                "type": "entry",
                "space_type": "standard",
                "observed_at": at.isoformat(),
            }
            for event_id in ids
        ]
        resp = operator.post("/v1/events", json={"events": events})
        assert resp.status_code == 200, resp.text
        assert resp.json()["accepted"] == len(ids), resp.text

    # the first searches find no vouched geo index in the empty Redis: a refill starts
    found()
    wait_for(lambda: bool(client.exists(GEO_COMPLETE_KEY)), timeout=30, what="the refill")
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    assert _tracked(client), "no connection of the availability worker is tracked"
    assert counts() == (0, 0)

    # a lot detail takes the lot the search vouched for, after a PING
    assert detail_from_cache()

    entries("in-1")
    assert counts() == (1, 0)  # the very next search
    assert served_from_cache() and counts() == (1, 0)

    now = datetime.now(UTC)
    made = reserve(driver, lot_id, now, now + timedelta(hours=1), plate="浙A20001")
    assert made.status_code == 201, made.text
    assert counts() == (1, 1)
    # (that search filled the reserved counts from PostgreSQL; the next read vouches for them)
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")

    # a window starting soon: the cached reserved counts stop at its start
    soon = datetime.now(UTC) + timedelta(seconds=3)
    later = reserve(driver, lot_id, soon, soon + timedelta(hours=1), plate="浙A20002")
    assert later.status_code == 201, later.text
    assert counts() == (1, 1)
    wait_for(lambda: counts() == (1, 2), timeout=15, interval=0.1, what="the window's start")
    assert datetime.now(UTC) >= soon

    cancelled = driver.post(f"/v1/reservations/{made.json()['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert counts() == (1, 1)

    # the tracked connection killed: its invalidations are lost, so nothing vouched for stays
    # so, even a lot no search reads until Redis is used again on a new connection
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    for tracked in _tracked(client):
        client.client_kill_filter(_id=tracked["id"])
    elsewhere = (other_id, far)
    found(*elsewhere)  # the kill noticed
    entries("in-2")
    wait_for(lambda: served_from_cache(*elsewhere), timeout=10, interval=0.05, what="tracking")
    assert counts() == (2, 1)
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    entries("in-3")
    assert counts() == (3, 1)

    # a flush: answered from PostgreSQL, then from Redis refilled, with every change seen
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    client.flushall()
    assert counts() == (3, 1)
    wait_for(lambda: bool(client.exists(GEO_COMPLETE_KEY)), timeout=30, what="the refill")
    entries("in-4")
    assert counts() == (4, 1)
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    entries("in-5")
    assert counts() == (5, 1)

    # the geo index copied: a lot registered, moved or deleted is seen by the very next search
    wait_for(served_from_cache, timeout=10, interval=0.05, what="a search from the cache")
    near = facts.offset(lat, lon, 60, 30)
    added = new_lot("Tracked P3", *near)
    assert found(added)["id"] == added
    wait_for(served_from_cache, timeout=10, interval=0.05, what="the index copied again")
    moved = operator.patch(f"/v1/lots/{added}", json={"location": {"lat": far[0], "lon": far[1]}})
    assert moved.status_code == 200, moved.text
    assert added not in ids_near(lat, lon) and added in ids_near(*far)
    wait_for(served_from_cache, timeout=10, interval=0.05, what="the index copied again")
    wait_for(lambda: detail_from_cache(added), timeout=10, interval=0.05, what="a detail")
    assert operator.delete(f"/v1/lots/{added}").status_code == 204
    assert anonymous.get(f"/v1/lots/{added}").status_code == 404  # the very next detail
    assert added not in ids_near(*far)
