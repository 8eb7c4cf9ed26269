"""The city API through the gateway and real processes: access, snapshot, NGSI-LD, aggregates."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from services.common import livestate
from services.ingestion import registry
from services.worker import rollups
from tests.city import facts
from tests.stack import Client, Stack

PROBLEM = "application/problem+json"
FIWARE = Path("/work/shared/standards/fiware")
if not FIWARE.exists():
    FIWARE = Path(__file__).resolve().parents[3] / "shared" / "standards" / "fiware"


@pytest.fixture
def city(new_city: Any) -> Client:
    return new_city("Hangzhou brain")[1]


@pytest.fixture
def district_lots(
    stack: Stack, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> dict[str, Any]:
    """Two districts of fresh lots with some occupancy, in PostgreSQL and Redis."""
    op = facts.operator(conn)
    now = datetime.now(UTC)
    names = [f"d{uuid.uuid4().hex[:8]}", f"d{uuid.uuid4().hex[:8]}"]
    lots = {
        "a1": facts.lot(conn, op, district=names[0], spaces=4, client=redis_client),
        "a2": facts.lot(
            conn, op, district=names[0], capacity={"standard": 10, "ev": 2}, client=redis_client
        ),
        "b1": facts.lot(conn, op, district=names[1], spaces=2, client=redis_client),
    }
    facts.ingest(
        conn,
        op,
        [
            facts.space(lots["a1"], "S-000", True, now),
            facts.space(lots["a1"], "S-001", True, now),
            facts.count(lots["a2"], {"standard": 7, "ev": 1}, now),
            facts.gate(lots["a2"], "entry", now + timedelta(seconds=1), "ev"),
            facts.space(lots["b1"], "S-000", True, now),
            facts.space(lots["b1"], "S-001", True, now),
        ],
        client=redis_client,
    )
    return {"op": op, "districts": names, "lots": lots}


def test_city_routes_want_a_city_key(stack: Stack, anonymous: Client, new_operator: Any) -> None:
    _, operator = new_operator()
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    anonymous.post("/v1/drivers", json={"email": email, "password": "correct horse battery"})
    token = anonymous.post(
        "/v1/auth/token", json={"email": email, "password": "correct horse battery"}
    )
    clients = {"operator": operator}
    if token.status_code == 200:
        clients["driver"] = Client(stack.url, token.json()["access_token"])
    routes = [
        ("GET", "/v1/city/snapshot"),
        ("GET", "/v1/city/aggregates"),
        ("GET", "/v1/city/subscriptions"),
        ("POST", "/v1/city/subscriptions"),
        ("DELETE", f"/v1/city/subscriptions/{uuid.uuid4()}"),
    ]
    for method, path in routes:
        resp = anonymous.request(method, path, json={})
        assert resp.status_code == 401, (method, path)
        assert resp.headers["Content-Type"] == PROBLEM
        for role, client in clients.items():
            resp = client.request(method, path, json={})
            assert resp.status_code == 403, (role, method, path)
            assert resp.json()["code"] == "forbidden"
    assert "driver" in clients, "driver accounts are available"


def test_snapshot_totals_are_the_sum_of_the_lots(
    city: Client, district_lots: dict[str, Any]
) -> None:
    resp = city.get("/v1/city/snapshot")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    lots = {lot["id"]: lot for lot in body["lots"]}
    ids = district_lots["lots"]
    assert {k: (lots[v]["capacity"], lots[v]["occupied"]) for k, v in ids.items()} == {
        "a1": (4, 2),
        "a2": (12, 9),
        "b1": (2, 2),
    }
    assert lots[ids["b1"]]["free"] == 0 and lots[ids["a1"]]["updated_at"]
    districts = {d["district"]: d for d in body["districts"]}
    first, second = (districts[n] for n in district_lots["districts"])
    assert (first["capacity"], first["occupied"], first["free"], first["lots"]) == (16, 11, 5, 2)
    assert (second["occupancy_rate"], second["free"]) == (1.0, 0)
    for d in body["districts"]:
        members = [lot for lot in body["lots"] if lot["district"] == d["district"]]
        assert d["capacity"] == sum(m["capacity"] for m in members)
        assert d["occupied"] == sum(m["occupied"] for m in members)
    totals = body["totals"]
    assert totals["capacity"] == sum(lot["capacity"] for lot in body["lots"])
    assert totals["occupied"] == sum(lot["occupied"] for lot in body["lots"])
    assert totals["free"] == sum(lot["free"] for lot in body["lots"])


def test_snapshot_falls_back_to_postgresql(
    city: Client,
    district_lots: dict[str, Any],
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    def view() -> dict[str, Any]:
        resp = city.get("/v1/city/snapshot")
        assert resp.status_code == 200
        body = resp.json()
        body.pop("generated_at")
        for lot in body["lots"]:
            lot.pop("updated_at")
        return body

    registry.rebuild_cache(conn, redis_client)  # every lot other tests made, in Redis too
    before = view()
    a1 = district_lots["lots"]["a1"]
    redis_client.delete(livestate.lot_key(a1))  # one lot missing: filled from PostgreSQL
    assert view() == before
    try:
        livestate.flush(redis_client)  # nothing in Redis: all from PostgreSQL
        assert view() == before
    finally:
        registry.rebuild_cache(conn, redis_client)


def _schema_validator() -> Draft202012Validator:
    schema = json.loads((FIWARE / "OffStreetParking.schema.json").read_text())
    common = json.loads((FIWARE / "common-schema.json").read_text())
    reg = Registry().with_resource(
        "https://smart-data-models.github.io/data-models/common-schema.json",
        Resource.from_contents(common),
    )
    return Draft202012Validator(
        schema, registry=reg, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def _reduce(entity: dict[str, Any]) -> dict[str, Any]:
    """A normalized NGSI-LD entity as key-values (README of the standards folder)."""
    out: dict[str, Any] = {}
    for name, value in entity.items():
        if isinstance(value, dict) and value.get("type") in ("Property", "GeoProperty"):
            inner = value["value"]
            if isinstance(inner, dict) and "@value" in inner:
                inner = inner["@value"]
            out[name] = inner
        else:
            out[name] = value
    return out


def test_snapshot_as_ngsi_ld_offstreetparking(city: Client, district_lots: dict[str, Any]) -> None:
    validator = _schema_validator()
    example = json.loads((FIWARE / "OffStreetParking.example-keyvalues.json").read_text())
    validator.validate(example)  # the validator itself accepts the model's own example
    ids = district_lots["lots"]
    for options in ("", "?options=keyValues"):
        resp = city.get(f"/v1/city/snapshot{options}", headers={"Accept": "application/ld+json"})
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("application/ld+json")
        entities = {e["id"]: e for e in resp.json()}
        for key, lot_id in ids.items():
            entity = entities[f"urn:ngsi-ld:OffStreetParking:{lot_id}"]
            assert entity["type"] == "OffStreetParking" and entity["@context"]
            flat = entity if options else _reduce(entity)
            if not options:
                assert entity["availableSpotNumber"]["type"] == "Property"
                assert entity["location"]["type"] == "GeoProperty"
            errors = [e.message for e in validator.iter_errors(flat)]
            assert not errors, (key, errors)
            assert flat["location"] == {"type": "Point", "coordinates": [120.087, 30.135]}
            assert (
                flat["availableSpotNumber"] + flat["occupiedSpotNumber"]
                == (flat["totalSpotNumber"])
            )
            assert isinstance(flat["occupancy"], float | int) and 0 <= flat["occupancy"] <= 1
        b1 = entities[f"urn:ngsi-ld:OffStreetParking:{ids['b1']}"]
        assert (b1 if options else _reduce(b1))["status"] == ["full"]
        a1 = _reduce(entities[f"urn:ngsi-ld:OffStreetParking:{ids['a1']}"])
        assert (a1["totalSpotNumber"], a1["occupiedSpotNumber"], a1["occupancy"]) == (4, 2, 0.5)
        assert a1["status"] == ["spacesAvailable"]


def test_aggregates_read_the_buckets(
    city: Client, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    t0 = rollups.floor_to(datetime.now(UTC) - timedelta(days=2), timedelta(hours=1))
    district = f"d{uuid.uuid4().hex[:8]}"
    op = facts.operator(conn)
    lot_id = facts.lot(conn, op, district=district, spaces=2, created_at=t0 - timedelta(hours=1))
    facts.ingest(
        conn,
        op,
        [
            facts.space(lot_id, "S-000", True, t0 + timedelta(seconds=30)),
            facts.space(lot_id, "S-001", True, t0 + timedelta(minutes=20)),
        ],
    )
    rollups.recompute(conn, start=t0, end=t0 + timedelta(minutes=30))
    q = f"&from={t0.isoformat()}&to={(t0 + timedelta(minutes=30)).isoformat()}".replace("+", "%2B")
    resp = city.get(f"/v1/city/aggregates?level=lot&key={lot_id}&interval=1m{q}")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["level"], body["key"], body["interval"]) == ("lot", lot_id, "1m")
    assert len(body["series"]) == 30
    first = body["series"][0]
    assert set(first) == {
        "bucket",
        "occupancy_rate_avg",
        "occupied_avg",
        "occupied_max",
        "capacity",
        "entries",
        "exits",
    }
    assert (first["occupied_avg"], first["occupied_max"], first["occupancy_rate_avg"]) == (
        0.5,
        1,
        0.25,
    )
    assert first["entries"] == 1
    quarter = city.get(f"/v1/city/aggregates?level=district&key={district}&interval=15m{q}")
    series = quarter.json()["series"]
    assert [p["entries"] for p in series] == [1, 1]
    assert series[1]["occupied_max"] == 2
    city_level = city.get(f"/v1/city/aggregates?level=city&interval=1h{q}")
    assert city_level.status_code == 200 and city_level.json()["key"] == "city"


def test_aggregates_validate_and_bound_their_ranges(city: Client) -> None:
    now = datetime.now(UTC)

    def get(query: str) -> Any:
        return city.get("/v1/city/aggregates?" + query.replace("+", "%2B"))

    too_long = get(f"interval=1m&from={(now - timedelta(days=2)).isoformat()}&to={now.isoformat()}")
    assert too_long.status_code == 422 and too_long.headers["Content-Type"] == PROBLEM
    body = too_long.json()
    assert body["code"] == "validation" and "too large for interval 1m" in body["detail"]
    assert body["errors"][0]["loc"] == ["query", "to"]
    ok = get(f"interval=1h&from={(now - timedelta(days=2)).isoformat()}&to={now.isoformat()}")
    assert ok.status_code == 200
    for bad in (
        "interval=5m",
        "level=planet",
        f"from={now.isoformat()}&to={(now - timedelta(hours=1)).isoformat()}",
        "from=yesterday",
        "from=2026-01-01T00:00:00",
        "to=0.5",
        "from=1999-12-31T00:00:00Z",
        "level=lot&key=a%00b",
        "level=district",
    ):
        resp = get(bad)
        assert resp.status_code == 422, bad
        assert resp.headers["Content-Type"] == PROBLEM and resp.json()["errors"], bad
    assert get(f"level=lot&key={uuid.uuid4()}").status_code == 404
    assert get("level=district&key=nowhere").status_code == 404


def test_subscriptions_belong_to_their_city_client(new_city: Any) -> None:
    _, first = new_city("first")
    _, second = new_city("second")
    made = first.post(
        "/v1/city/subscriptions",
        json={"url": "http://127.0.0.1:9/hook", "events": ["lot.full"], "secret": "s" * 32},
    )
    assert made.status_code == 201, made.text
    sub = made.json()
    assert sub["secret"] == "s" * 32 and sub["events"] == ["lot.full"]
    generated = first.post(
        "/v1/city/subscriptions",
        json={"url": "https://example.org/in", "events": ["district.snapshot"]},
    ).json()
    assert len(generated["secret"]) >= 32
    listed = first.get("/v1/city/subscriptions").json()["items"]
    assert {s["id"] for s in listed} == {sub["id"], generated["id"]}
    assert all("secret" not in s for s in listed)
    assert second.get("/v1/city/subscriptions").json()["items"] == []
    path = f"/v1/city/subscriptions/{sub['id']}"
    assert second.get(path).status_code == 404
    assert second.delete(path).status_code == 404
    assert second.get(path + "/deliveries").status_code == 404
    assert first.get(path).json()["url"] == "http://127.0.0.1:9/hook"
    # Any lot of the city crossing full (other tests' lots too) queues a delivery, so the
    # list need not be empty: it holds only this subscription's event type.
    deliveries = first.get(path + "/deliveries")
    assert deliveries.status_code == 200
    assert all(d["event"] == "lot.full" for d in deliveries.json()["items"])
    assert first.delete(path).status_code == 204
    assert first.get(path).status_code == 404
    assert first.get("/v1/city/subscriptions/not-a-uuid").status_code == 404
    assert first.delete("/v1/city/subscriptions/a%00b").status_code == 404
    for bad in (
        {"url": "ftp://x/y", "events": ["lot.full"]},
        {"url": "http://127.0.0.1/x", "events": []},
        {"url": "http://127.0.0.1/x", "events": ["lot.exploded"]},
        {"url": "http://127.0.0.1/x", "events": ["lot.full"], "secret": "short"},
        {"url": "http://127.0.0.1/x", "events": ["lot.full"], "extra": 1},
        {"url": "http://127.0.0.1/a\u0000b", "events": ["lot.full"]},
        {"url": "http://127.0.0.1/x", "events": ["lot.full"], "secret": "0123456789abcdef\u0000"},
    ):
        resp = first.post("/v1/city/subscriptions", json=bad)
        assert resp.status_code == 422, bad


def test_openapi_documents_the_city_routes(anonymous: Client) -> None:
    paths = anonymous.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/city/snapshot",
        "/v1/city/aggregates",
        "/v1/city/subscriptions",
        "/v1/city/subscriptions/{subscription_id}",
    ):
        assert path in paths, path
