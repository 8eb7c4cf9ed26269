"""GET /v1/lots near a point: filters, order, distances, paging, validation, both read paths."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis

from services.availability.domain import haversine_m
from services.availability.readpath import GEO_COMPLETE_KEY, ReadPath
from tests.availability import facts
from tests.stack import Client

PROBLEM = "application/problem+json"


@pytest.fixture
def neighbourhood(
    conn: psycopg.Connection[Any], redis_client: redis.Redis, operator_id: str
) -> dict[str, Any]:
    """Six lots north of a random point at 100..1200 m, with various free spaces."""
    lat, lon = facts.somewhere()
    lots: dict[str, str] = {}
    layout = [
        ("a", 100, {"standard": 10, "ev": 2}, {"standard": 10, "ev": 0}),  # only EV free
        ("b", 300, {"standard": 10}, {"standard": 5}),
        ("c", 500, {"standard": 10}, {"standard": 10}),  # full
        ("d", 700, {"standard": 10, "ev": 4}, {"standard": 2, "ev": 1}),
        ("e", 900, {"standard": 10}, {"standard": 9}),
        ("f", 1200, {"standard": 10}, {"standard": 0}),  # beyond 1 km
    ]
    for name, north, capacity, occupied in layout:
        plat, plon = facts.offset(lat, lon, north)
        lot_id = facts.lot(
            conn, operator_id, lat=plat, lon=plon, capacity=capacity, name=name, client=redis_client
        )
        facts.set_occupied(conn, redis_client, lot_id, occupied)
        lots[name] = lot_id
    closed_lat, closed_lon = facts.offset(lat, lon, 400)
    lots["closed"] = facts.lot(
        conn,
        operator_id,
        lat=closed_lat,
        lon=closed_lon,
        opening_hours=facts.closed_hours(),
        name="closed",
        client=redis_client,
    )
    facts.set_occupied(conn, redis_client, lots["closed"], {"standard": 0})
    return {"lat": lat, "lon": lon, "lots": lots}


def names(resp: Any) -> list[str]:
    assert resp.status_code == 200, (resp.url, resp.text)
    return [item["name"] for item in resp.json()["items"]]


def test_nearest_first_with_free_spaces_and_distances(
    anonymous: Client, neighbourhood: dict[str, Any], complete_geo: ReadPath
) -> None:
    lat, lon = neighbourhood["lat"], neighbourhood["lon"]
    resp = anonymous.get("/v1/lots", params={"lat": lat, "lon": lon})
    assert names(resp) == ["a", "b", "d", "e"]  # c full, closed closed, f beyond 1000 m
    body = resp.json()
    assert body["next_cursor"] is None
    for item in body["items"]:
        expected = haversine_m(lat, lon, item["location"]["lat"], item["location"]["lon"])
        assert item["distance_m"] == round(expected, 1)
        assert {"id", "capacity", "free", "free_total", "status", "updated_at"} <= set(item)
    assert [round(i["distance_m"]) for i in body["items"]] == [100, 300, 700, 900]

    def search(**params: Any) -> list[str]:
        return names(anonymous.get("/v1/lots", params={"lat": lat, "lon": lon, **params}))

    assert search(radius_m=2000) == ["a", "b", "d", "e", "f"]
    assert search(radius_m=350) == ["a", "b"]
    assert search(space_type="ev") == ["a", "d"]
    assert search(space_type="ev", min_free=2) == ["a", "d"]
    assert search(space_type="ev", min_free=3) == ["d"]
    assert search(min_free=5) == ["b", "d"]  # free_total without a space type
    assert search(min_free=9) == ["d"]
    assert search(min_free=0, radius_m=600) == ["a", "b", "closed", "c"]


def test_pages_follow_the_cursor_to_the_end(
    anonymous: Client, neighbourhood: dict[str, Any], complete_geo: ReadPath
) -> None:
    params = {"lat": neighbourhood["lat"], "lon": neighbourhood["lon"], "radius_m": 5000}
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        resp = anonymous.get("/v1/lots", params={**params, "limit": 2, "cursor": cursor})
        page = names(resp)
        assert len(page) <= 2
        seen += page
        cursor = resp.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ["a", "b", "d", "e", "f"]


def test_postgresql_answers_the_same_when_the_geo_index_is_not_complete(
    anonymous: Client,
    neighbourhood: dict[str, Any],
    complete_geo: ReadPath,
    redis_client: redis.Redis,
) -> None:
    queries = [
        {"radius_m": 5000, "limit": 3},
        {"radius_m": 1000, "space_type": "ev"},
        {"radius_m": 2000, "min_free": 0},
        {"radius_m": 800, "min_free": 3},
    ]
    base = {"lat": neighbourhood["lat"], "lon": neighbourhood["lon"]}
    from_redis = [anonymous.get("/v1/lots", params={**base, **q}).json() for q in queries]
    second_page = anonymous.get(
        "/v1/lots", params={**base, **queries[0], "cursor": from_redis[0]["next_cursor"]}
    ).json()
    redis_client.delete(GEO_COMPLETE_KEY)
    from_pg = [anonymous.get("/v1/lots", params={**base, **q}).json() for q in queries]
    assert from_pg == from_redis
    assert (
        anonymous.get(
            "/v1/lots", params={**base, **queries[0], "cursor": from_redis[0]["next_cursor"]}
        ).json()
        == second_page
    )
    # the search that found the index incomplete started a refill, which vouches for it again
    from tests.stack import wait_for

    wait_for(lambda: redis_client.exists(GEO_COMPLETE_KEY), timeout=30, what="refill")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"lat": 30.1},
        {"lat": "north", "lon": 120.0},
        {"lat": 91, "lon": 120.0},
        {"lat": 30.1, "lon": -181},
        {"lat": 30.1, "lon": 120.0, "radius_m": 50001},
        {"lat": 30.1, "lon": 120.0, "radius_m": 0},
        {"lat": 30.1, "lon": 120.0, "limit": 101},
        {"lat": 30.1, "lon": 120.0, "limit": 0},
        {"lat": 30.1, "lon": 120.0, "min_free": -1},
        {"lat": 30.1, "lon": 120.0, "space_type": "truck"},
        {"lat": 30.1, "lon": 120.0, "cursor": "not-a-cursor"},
        {"lat": "nan", "lon": 120.0},
        {"lat": 30.1, "lon": "inf"},
    ],
)
def test_invalid_parameters_are_422_problems(anonymous: Client, params: dict[str, Any]) -> None:
    resp = anonymous.get("/v1/lots", params=params)
    assert resp.status_code == 422, resp.text
    assert resp.headers["Content-Type"] == PROBLEM
    body = resp.json()
    assert body["code"] == "validation" and body["errors"]
    assert all(e["loc"][0] == "query" for e in body["errors"])
