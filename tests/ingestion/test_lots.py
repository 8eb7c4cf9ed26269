"""The lot registry through the gateway: owned by the calling operator, validated, in Redis."""

from __future__ import annotations

from typing import Any

import psycopg
import redis

from tests.ingestion.helpers import (
    create_lot,
    gate,
    gate_lot_body,
    occupancy,
    post,
    redis_occupancy,
    space,
    space_lot_body,
)
from tests.stack import Client, Stack, wait_for

PROBLEM = "application/problem+json"


def _count_lots(conn: psycopg.Connection[Any], operator_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM lots WHERE operator_id = %s", (operator_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_create_read_list_a_space_lot(
    new_operator: Any, redis_client: redis.Redis, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, space_lot_body(4))
    assert lot["capacity"] == {"standard": 3, "ev": 1}
    assert lot["reservable"] == {"standard": 1}
    assert lot["tariff"]["per_hour"] == "5.00"
    assert [s["id"] for s in lot["spaces"]] == ["A-000", "A-001", "A-002", "A-003"]
    mine = operator.get(f"/v1/lots/{lot['id']}?mine=1")
    assert mine.status_code == 200, mine.text
    view = mine.json()
    assert view["occupied"] == {"standard": 0, "ev": 0}
    assert view["spaces"][0] == {
        "id": "A-000",
        "type": "standard",
        "occupied": False,
        "observed_at": None,
    }
    listed = operator.get("/v1/lots?mine=1").json()
    assert [item["id"] for item in listed["items"]] == [lot["id"]]
    assert listed["next_cursor"] is None
    # the registry summary and the live state are in Redis for the availability service
    assert redis_client.exists(f"lotmeta:{lot['id']}")
    assert redis_occupancy(redis_client, lot["id"]) == {"standard": 0, "ev": 0}
    assert redis_client.geopos("lots:geo", lot["id"])[0] is not None


def test_list_mine_pages(new_operator: Any) -> None:
    _, operator = new_operator()
    ids = sorted(create_lot(operator, gate_lot_body())["id"] for _ in range(3))
    first = operator.get("/v1/lots?mine=1&limit=2").json()
    assert [i["id"] for i in first["items"]] == ids[:2] and first["next_cursor"] == ids[1]
    second = operator.get(f"/v1/lots?mine=1&limit=2&cursor={first['next_cursor']}").json()
    assert [i["id"] for i in second["items"]] == ids[2:] and second["next_cursor"] is None


def test_another_operators_lot_is_not_found(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, owner = new_operator()
    _, other = new_operator()
    lot = create_lot(owner, gate_lot_body())
    missing = "00000000-0000-0000-0000-000000000000"
    for lot_id in (lot["id"], missing, "not-a-uuid"):
        for resp in (
            other.get(f"/v1/lots/{lot_id}?mine=1"),
            other.patch(f"/v1/lots/{lot_id}", json={"name": "Mine now"}),
            other.delete(f"/v1/lots/{lot_id}"),
        ):
            assert resp.status_code == 404, (lot_id, resp.text)
            assert resp.headers["Content-Type"] == PROBLEM and resp.json()["code"] == "not-found"
    assert other.get("/v1/lots?mine=1").json()["items"] == []
    assert owner.get(f"/v1/lots/{lot['id']}?mine=1").json()["name"] == "Xihu Gate Lot"


def test_invalid_lots_are_problems_and_change_nothing(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    operator_id, operator = new_operator()
    good = space_lot_body(2)
    bad_bodies = [
        {**good, "capacity": {"standard": 3}},  # both spaces and capacity
        {k: v for k, v in good.items() if k != "spaces"},  # neither
        {**good, "reservable": {"standard": 5}},  # more than its capacity
        {**good, "reservable": {"ev": 1}},  # a type it does not have
        {**good, "opening_hours": "all day"},
        {**good, "timezone": "Mars/Olympus"},
        {**good, "location": {"lat": 91, "lon": 0}},
        {**good, "spaces": [{"id": "A", "type": "standard"}, {"id": "A", "type": "ev"}]},
        {**good, "spaces": [{"id": "A", "type": "limousine"}]},
        {**good, "operator_id": "00000000-0000-0000-0000-000000000000"},
        {**good, "id": "00000000-0000-0000-0000-000000000000"},
        {**gate_lot_body(), "capacity": {"standard": 0}},
        {**gate_lot_body(), "capacity": {"standard": -1}},
        {**good, "tariff": {"per_hour": "-1"}},
        {**good, "district": "Xi Hu!"},
        {**good, "name": ""},
        [good],
    ]
    for body in bad_bodies:
        resp = operator.post("/v1/lots", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.headers["Content-Type"] == PROBLEM and resp.json()["errors"]
    resp = operator.post("/v1/lots", data=b"{", headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 422) and resp.headers["Content-Type"] == PROBLEM
    assert _count_lots(conn, operator_id) == 0


def test_patch_keeps_space_states_and_recounts(
    new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, space_lot_body(4))
    lid = lot["id"]
    post(operator, [space(lid, f"A-00{i}", True, 1) for i in range(4)])
    assert occupancy(conn, lid) == {"standard": 3, "ev": 1}
    spaces = [{"id": "A-000", "type": "standard"}, {"id": "A-003", "type": "standard"}]
    spaces.append({"id": "B-001", "type": "accessible"})
    resp = operator.patch(
        f"/v1/lots/{lid}",
        json={"name": "Renamed", "spaces": spaces, "tariff": {"per_hour": "6.50"}},
    )
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["name"] == "Renamed" and view["tariff"]["per_hour"] == "6.50"
    assert view["capacity"] == {"standard": 2, "accessible": 1}
    assert view["occupied"] == {"standard": 2, "accessible": 0}
    assert view["reservable"] == {"standard": 1}
    assert occupancy(conn, lid) == {"standard": 2, "accessible": 0}

    def redis_has_it() -> bool:
        return redis_occupancy(redis_client, lid) == {"standard": 2, "accessible": 0}

    wait_for(redis_has_it, timeout=5, what="the patched lot in Redis")
    # a removed space is unknown to events now
    body = post(operator, [space(lid, "A-001", False, 2)])
    assert body["rejected"][0]["code"] == "unknown-space"


def test_patch_of_a_gate_lot_reclamps_and_validates_as_a_whole(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, gate_lot_body({"standard": 5, "ev": 2}, reservable={"ev": 1}))
    lid = lot["id"]
    post(operator, [gate(lid, "entry", t) for t in range(4)])
    assert occupancy(conn, lid) == {"standard": 4, "ev": 0}
    before = operator.get(f"/v1/lots/{lid}?mine=1").json()
    for patch in (
        {"capacity": {"standard": 5}},  # drops ev, which is reservable
        {"reservable": {"standard": 6}},
        {"spaces": [{"id": "A", "type": "standard"}]},  # counting cannot change
        {"name": None},
        {"owner": "x"},
    ):
        resp = operator.patch(f"/v1/lots/{lid}", json=patch)
        assert resp.status_code == 422, (patch, resp.text)
        assert resp.headers["Content-Type"] == PROBLEM
    assert operator.get(f"/v1/lots/{lid}?mine=1").json() == before
    resp = operator.patch(
        f"/v1/lots/{lid}", json={"capacity": {"standard": 2, "ev": 2, "motorcycle": 3}}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["occupied"] == {"standard": 2, "ev": 0, "motorcycle": 0}
    # the count behind the clamp is kept: two exits leave 2 of the 4 cars inside
    post(operator, [gate(lid, "exit", 10), gate(lid, "exit", 11)])
    assert occupancy(conn, lid) == {"standard": 2, "ev": 0, "motorcycle": 0}


def test_delete_retires_the_lot_everywhere(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, gate_lot_body())
    lid = lot["id"]
    post(operator, [gate(lid, "entry", 1)])
    assert redis_client.exists(f"lot:{lid}")
    assert operator.delete(f"/v1/lots/{lid}").status_code == 204
    assert operator.get(f"/v1/lots/{lid}?mine=1").status_code == 404
    assert operator.delete(f"/v1/lots/{lid}").status_code == 404
    assert operator.get("/v1/lots?mine=1").json()["items"] == []
    body = post(operator, [gate(lid, "entry", 2)])
    assert body["rejected"][0]["code"] == "unknown-lot"
    assert not redis_client.exists(f"lot:{lid}") and not redis_client.exists(f"lotmeta:{lid}")
    assert redis_client.geopos("lots:geo", lid)[0] is None
    # its history stays
    row = conn.execute("SELECT count(*) FROM events WHERE lot_id = %s", (lid,)).fetchone()
    assert row == (1,)


def test_only_operators_manage_lots(stack: Stack, anonymous: Client, new_city: Any) -> None:
    _, city = new_city()
    assert anonymous.post("/v1/lots", json=space_lot_body()).status_code == 401
    assert city.post("/v1/lots", json=space_lot_body()).status_code == 403
    assert city.get("/v1/lots?mine=1").status_code == 403
