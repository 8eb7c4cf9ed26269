"""Nearby search where lots are dense: a search reads about a page of the nearest candidates,
not every one it fetched, and still answers exactly what ranking every lot would, page by page,
from Redis and from PostgreSQL alike (ties in distance and filters that leave pages short
included)."""

from __future__ import annotations

import random
from typing import Any

import psycopg
import pytest
import redis

from services.availability.domain import haversine_m
from services.availability.readpath import GEO_COMPLETE_KEY, ReadPath
from tests.availability import facts
from tests.stack import Client, wait_for


@pytest.fixture
def cluster(
    conn: psycopg.Connection[Any], redis_client: redis.Redis, operator_id: str
) -> dict[str, Any]:
    """40 lots within 400 m of a random point, some pairs at one distance, random free spaces."""
    lat, lon = facts.somewhere()
    rng = random.Random()
    lots: dict[str, dict[str, Any]] = {}
    for n in range(40):
        north = rng.uniform(-400, 400) if n % 4 else 150.0  # every fourth at 150 m north
        east = rng.uniform(-300, 300) if n % 4 else 0.0
        plat, plon = facts.offset(lat, lon, north, east)
        capacity = {"standard": 10, "ev": 2} if n % 3 == 0 else {"standard": 10}
        occupied = {t: rng.randint(0, c) for t, c in capacity.items()}
        lot_id = facts.lot(
            conn, operator_id, lat=plat, lon=plon, capacity=capacity, client=redis_client
        )
        facts.set_occupied(conn, redis_client, lot_id, occupied)
        free = {t: capacity[t] - occupied[t] for t in capacity}
        lots[lot_id] = {"lat": plat, "lon": plon, "free": free}
    return {"lat": lat, "lon": lon, "lots": lots}


def truth(cluster: dict[str, Any], radius: float, space_type: str | None, min_free: int) -> list:
    """Every lot that answers the query, nearest first (ties by id)."""
    ranked = []
    for lot_id, lot in cluster["lots"].items():
        d = haversine_m(cluster["lat"], cluster["lon"], lot["lat"], lot["lon"])
        free = lot["free"].get(space_type, 0) if space_type else sum(lot["free"].values())
        if d <= radius and (min_free <= 0 or free >= min_free):
            ranked.append((d, lot_id))
    return [lot_id for _, lot_id in sorted(ranked)]


def walk(client: Client, cluster: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The ids of every page of a search, following its cursor (bounded)."""
    ids: list[str] = []
    cursor = None
    for _ in range(60):
        resp = client.get(
            "/v1/lots",
            params={"lat": cluster["lat"], "lon": cluster["lon"], **params, "cursor": cursor},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["items"]) <= params["limit"]
        ids += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("the pages did not end")


QUERIES = [
    {"radius_m": 1000, "limit": 20},
    {"radius_m": 1000, "limit": 7},
    {"radius_m": 250, "limit": 3},
    {"radius_m": 1000, "limit": 5, "min_free": 6},
    {"radius_m": 1000, "limit": 4, "space_type": "ev", "min_free": 1},
    {"radius_m": 500, "limit": 1},
]


def test_every_page_is_what_ranking_every_lot_gives(
    anonymous: Client,
    cluster: dict[str, Any],
    complete_geo: ReadPath,
    redis_client: redis.Redis,
) -> None:
    expected = [
        truth(cluster, q["radius_m"], q.get("space_type"), q.get("min_free", 1)) for q in QUERIES
    ]
    assert all(expected) and len(expected[0]) > 20  # the first query has a second page
    from_redis = [walk(anonymous, cluster, q) for q in QUERIES]
    assert from_redis == expected
    redis_client.delete(GEO_COMPLETE_KEY)
    from_pg = [walk(anonymous, cluster, q) for q in QUERIES]
    assert from_pg == expected
    wait_for(lambda: redis_client.exists(GEO_COMPLETE_KEY), timeout=30, what="refill")
