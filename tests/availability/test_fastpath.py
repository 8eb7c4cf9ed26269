"""The WSGI fast path of nearby search answers as the Flask route does.

In process, against the real PostgreSQL and Redis: plain, valid searches are answered by the
fast path (the Flask app is not called), anything else (invalid, percent-encoded, other
methods) reaches the Flask route, and the answers match the Flask route's.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis
from werkzeug.test import Client

from services.availability.fastpath import FastLots
from services.availability.readpath import ReadPath
from tests.availability import facts
from tests.wsgi import Counting


@pytest.fixture
def apps(availability_app: Any) -> tuple[Client, Client, Counting]:
    """(client through the fast path, client of the Flask route alone, the counter)."""
    fast = availability_app.wsgi_app
    assert isinstance(fast, FastLots)
    counting = Counting(fast.wsgi_app)
    fast.wsgi_app = counting
    return Client(fast), Client(counting.app), counting


@pytest.fixture
def around(
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    operator_id: str,
    lookups: ReadPath,
) -> tuple[float, float]:
    """Eight lots 50..750 m north of a random point, one of them full; Redis vouched complete."""
    lat, lon = facts.somewhere()
    for n in range(8):
        plat, plon = facts.offset(lat, lon, 50 + 100 * n)
        lot_id = facts.lot(
            conn, operator_id, lat=plat, lon=plon, capacity={"standard": 10, "ev": 2},
            name=f"l{n}", client=redis_client,
        )  # fmt: skip
        facts.set_occupied(conn, redis_client, lot_id, {"standard": 10 if n == 3 else n, "ev": 0})
    lookups.refill(redis_client)
    return lat, lon


def answer(client: Client, url: str) -> tuple[int, str, Any]:
    resp = client.get(url)
    return resp.status_code, resp.headers["Content-Type"], resp.get_json()


def test_plain_valid_searches_are_answered_as_the_route_does_without_it(
    apps: tuple[Client, Client, Counting], around: tuple[float, float]
) -> None:
    fast, flask, counting = apps
    lat, lon = around
    base = f"/v1/lots?lat={lat}&lon={lon}"
    first = fast.get(base + "&limit=3").get_json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    urls = [
        base,
        base + "&radius_m=400",
        base + "&space_type=ev&min_free=0",
        base + "&min_free=5&limit=2",
        base + "&limit=3&cursor=" + first["next_cursor"],
        base + "&lat=0&lon=0",  # the first value of a repeated name counts, as in Flask
        base + "&unknown=1&&",
    ]
    for url in urls:
        before = counting.calls
        got = answer(fast, url)
        assert counting.calls == before, url  # the fast path answered
        assert got == answer(flask, url), url
        assert got[0] == 200 and got[2]["items"], url
    resp = fast.get(base)
    assert resp.headers["X-Request-ID"] and int(resp.headers["Content-Length"]) == len(resp.data)


@pytest.mark.parametrize(
    "query",
    [
        "",
        "lat=30.1",
        "lat=north&lon=120.0",
        "lat=91&lon=120",
        "lat=30.1&lon=120&limit=0",
        "lat=30.1&lon=120&space_type=truck",
        "lat=30.1&lon=120&cursor=not-a-cursor",
        "lat=nan&lon=120",
        "lat=30.1&lon=120&cursor=eyJkIjogLTEsICJpIjogIngifQ",  # a negative distance
        "lat=30%2E1&lon=120",  # percent-encoded: the route decodes it
        "lat=30.1&lon=+120",
    ],
)
def test_anything_else_reaches_the_route(apps: tuple[Client, Client, Counting], query: str) -> None:
    fast, flask, counting = apps
    url = "/v1/lots?" + query
    before = counting.calls
    got = answer(fast, url)
    assert counting.calls == before + 1, query
    assert got == answer(flask, url)
    assert got[0] in (200, 422), got


def test_lot_detail_answers_an_id_however_its_uuid_is_written(
    apps: tuple[Client, Client, Counting],
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    operator_id: str,
    lookups: ReadPath,
) -> None:
    """A lot read before is found by its id taken as written, without parsing it; the same lot
    named otherwise (upper case, braces, a URN) is still found, by its UUID."""
    fast, flask, counting = apps
    lat, lon = facts.somewhere()
    lot_id = facts.lot(
        conn, operator_id, lat=lat, lon=lon, capacity={"standard": 10}, client=redis_client
    )
    facts.set_occupied(conn, redis_client, lot_id, {"standard": 4})
    expected = answer(flask, f"/v1/lots/{lot_id}")
    assert expected[0] == 200 and expected[2]["id"] == lot_id
    for _ in range(2):  # read, then vouched for
        assert answer(fast, f"/v1/lots/{lot_id}") == expected
    assert lookups.knows(lot_id)
    for written in (lot_id.upper(), "{" + lot_id + "}", "urn:uuid:" + lot_id):
        assert not lookups.knows(written)
        before = counting.calls
        assert answer(fast, f"/v1/lots/{written}") == expected, written
        assert counting.calls == before, written  # the fast path answered
