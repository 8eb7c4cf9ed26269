"""The authorization matrix: every principal against every route and every object owner.

Two operators, two drivers, two city keys, admin and anonymous, through the real gateway. Each
cell has its expected status; after every refused call (and every mass-assignment attempt) the
database is checked to be unchanged.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.stack import Client, Stack

PRINCIPALS = ("anonymous", "admin", "op_a", "op_b", "drv_a", "drv_b", "city_a", "city_b")
ROLE = {
    "anonymous": "anonymous",
    "admin": "admin",
    "op_a": "operator",
    "op_b": "operator",
    "drv_a": "driver",
    "drv_b": "driver",
    "city_a": "city",
    "city_b": "city",
}


def _lot_body(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "location": {"lat": 30.2741, "lon": 120.1551},
        "district": "xihu",
        "spaces": [{"id": f"S-{i}", "type": "standard"} for i in range(6)],
        "reservable": {"standard": 3},
        "tariff": {"currency": "CNY", "per_hour": "4.00", "free_minutes": 15, "daily_max": "30.00"},
    }


@pytest.fixture(scope="module")
def world(stack: Stack, admin: Client) -> dict[str, Any]:
    clients: dict[str, Client] = {"anonymous": Client(stack.url), "admin": admin}
    ids: dict[str, str] = {}
    for name in ("op_a", "op_b"):
        body = admin.post("/v1/admin/operators", json={"name": f"authz {name}"}).json()
        clients[name], ids[name] = Client(stack.url, body["api_key"]), body["id"]
    for name in ("city_a", "city_b"):
        body = admin.post("/v1/admin/city-keys", json={"name": f"authz {name}"}).json()
        clients[name], ids[name] = Client(stack.url, body["api_key"]), body["id"]
    for name in ("drv_a", "drv_b"):
        email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
        anon = Client(stack.url)
        made = anon.post("/v1/drivers", json={"email": email, "password": "correct horse"})
        assert made.status_code == 201, made.text
        token = anon.post("/v1/auth/token", json={"email": email, "password": "correct horse"})
        clients[name], ids[name] = (
            Client(stack.url, token.json()["access_token"]),
            made.json()["id"],
        )
    lot_a = clients["op_a"].post("/v1/lots", json=_lot_body("authz A"))
    lot_b = clients["op_b"].post("/v1/lots", json=_lot_body("authz B"))
    assert lot_a.status_code == 201 and lot_b.status_code == 201, (lot_a.text, lot_b.text)
    ids["lot_a"], ids["lot_b"] = lot_a.json()["id"], lot_b.json()["id"]
    start = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    window = {"start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat()}
    ids["start"], ids["end"] = window["start"], window["end"]
    for name in ("drv_a", "drv_b"):
        made = clients[name].post(
            "/v1/reservations",
            json={"lot_id": ids["lot_a"], "space_type": "standard", "plate": "浙A12345", **window},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        assert made.status_code == 201, made.text
        ids[f"res_{name[-1]}"] = made.json()["id"]
    sub = clients["city_a"].post(
        "/v1/city/subscriptions",
        json={"url": "http://127.0.0.1:9/hook", "events": ["lot.full"]},
    )
    assert sub.status_code == 201, sub.text
    ids["sub_a"] = sub.json()["id"]
    return {"clients": clients, "ids": ids}


def fingerprint(database_url: str, ids: dict[str, str]) -> dict[str, str]:
    """A digest of every row a refused call could have touched."""
    lots = [ids["lot_a"], ids["lot_b"]]
    queries = {
        "operators": "SELECT * FROM operators",
        "city_clients": "SELECT * FROM city_clients",
        "api_keys": "SELECT * FROM api_keys",
        "lots": "SELECT * FROM lots",
        "spaces": "SELECT * FROM spaces WHERE lot_id = ANY(%(lots)s::uuid[])",
        "occupancy": "SELECT * FROM lot_occupancy WHERE lot_id = ANY(%(lots)s::uuid[])",
        "events": "SELECT operator_id, event_id FROM events WHERE lot_id = ANY(%(lots)s::uuid[])",
        "drivers": "SELECT * FROM drivers",
        "reservations": "SELECT * FROM reservations WHERE lot_id = ANY(%(lots)s::uuid[])",
        "idempotency": "SELECT driver_id, key FROM idempotency_keys",
        "subscriptions": "SELECT * FROM city_subscriptions",
    }
    out = {}
    with psycopg.connect(database_url) as conn:
        for name, query in queries.items():
            rows = conn.execute(query + " ORDER BY 1, 2", {"lots": lots}).fetchall()
            out[name] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return out


def gated(role: str, **overrides: int) -> dict[str, int]:
    """401 for anonymous, 403 for every other role but ``role``, 200 for ``role``."""
    expected = {p: 401 if p == "anonymous" else 200 if ROLE[p] == role else 403 for p in PRINCIPALS}
    expected.update(overrides)
    return expected


def everyone(status: int = 200) -> dict[str, int]:
    return dict.fromkeys(PRINCIPALS, status)


READS = [
    ("GET", "/v1/lots?mine=1", gated("operator")),
    ("GET", "/v1/lots/{lot_a}?mine=1", gated("operator", op_b=404)),
    ("GET", "/v1/lots/{lot_a}", everyone()),
    ("GET", "/v1/lots?lat=30.2741&lon=120.1551&radius_m=2000", everyone()),
    ("GET", "/v1/lots/{lot_a}/quote?space_type=standard&start={start}&end={end}", everyone()),
    ("GET", "/v1/lots/{lot_a}/history?interval=1h", everyone()),
    ("GET", "/v1/reservations", gated("driver")),
    ("GET", "/v1/reservations/{res_a}", gated("driver", drv_b=404)),
    ("GET", "/v1/reservations/{res_b}", gated("driver", drv_a=404)),
    ("GET", "/v1/city/snapshot", gated("city")),
    ("GET", "/v1/city/aggregates?level=city&interval=1h", gated("city")),
    ("GET", "/v1/city/subscriptions", gated("city")),
    ("GET", "/v1/city/subscriptions/{sub_a}", gated("city", city_b=404)),
]


def _fill(path: str, ids: dict[str, str]) -> str:
    return path.format(**{k: v.replace("+", "%2B") for k, v in ids.items()})


@pytest.mark.parametrize(
    ("method", "path", "expected"), READS, ids=[f"{m} {p}" for m, p, _ in READS]
)
def test_reads(world: dict[str, Any], method: str, path: str, expected: dict[str, int]) -> None:
    url = _fill(path, world["ids"])
    got = {p: world["clients"][p].request(method, url).status_code for p in PRINCIPALS}
    assert got == expected


def test_lists_show_only_what_is_yours(world: dict[str, Any]) -> None:
    clients, ids = world["clients"], world["ids"]
    mine = {lot["id"] for lot in clients["op_a"].get("/v1/lots?mine=1").json()["items"]}
    assert ids["lot_a"] in mine and ids["lot_b"] not in mine
    reservations = {r["id"] for r in clients["drv_a"].get("/v1/reservations").json()["items"]}
    assert reservations == {ids["res_a"]}
    subs = {s["id"] for s in clients["city_b"].get("/v1/city/subscriptions").json()["items"]}
    assert ids["sub_a"] not in subs


def _event(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "events": [
            {
                "id": f"authz-{uuid.uuid4().hex}",
                "lot_id": ids["lot_a"],
                "type": "space",
                "space_id": "S-1",
                "occupied": True,
                "observed_at": datetime.now(UTC).isoformat(),
            }
        ]
    }


def _writes(ids: dict[str, str]) -> list[tuple[str, str, Any, dict[str, int]]]:
    """(method, path, body, status per refused principal); allowed principals are not called."""
    reservation = {
        "lot_id": ids["lot_a"],
        "space_type": "standard",
        "plate": "浙B00001",
        "start": ids["start"],
        "end": ids["end"],
    }
    refused_admin = {p: s for p, s in gated("admin").items() if s != 200}
    return [
        ("POST", "/v1/admin/operators", {"name": "intruder"}, refused_admin),
        ("POST", "/v1/admin/city-keys", {"name": "intruder"}, refused_admin),
        (
            "POST",
            "/v1/lots",
            _lot_body("intruder"),
            {p: s for p, s in gated("operator").items() if s != 200},
        ),
        (
            "PATCH",
            f"/v1/lots/{ids['lot_a']}",
            {"name": "hijacked"},
            {**{p: s for p, s in gated("operator").items() if s != 200}, "op_b": 404},
        ),
        (
            "DELETE",
            f"/v1/lots/{ids['lot_a']}",
            None,
            {**{p: s for p, s in gated("operator").items() if s != 200}, "op_b": 404},
        ),
        (
            "POST",
            "/v1/events",
            _event(ids),
            {p: s for p, s in gated("operator").items() if s != 200},
        ),
        (
            "POST",
            "/v1/reservations",
            reservation,
            {p: s for p, s in gated("driver").items() if s != 200},
        ),
        (
            "POST",
            f"/v1/reservations/{ids['res_a']}/cancel",
            None,
            {**{p: s for p, s in gated("driver").items() if s != 200}, "drv_b": 404},
        ),
        (
            "POST",
            "/v1/city/subscriptions",
            {"url": "http://127.0.0.1:9/x", "events": ["lot.full"]},
            {p: s for p, s in gated("city").items() if s != 200},
        ),
        (
            "DELETE",
            f"/v1/city/subscriptions/{ids['sub_a']}",
            None,
            {**{p: s for p, s in gated("city").items() if s != 200}, "city_b": 404},
        ),
    ]


def test_refused_writes_change_nothing(world: dict[str, Any], database_url: str) -> None:
    clients, ids = world["clients"], world["ids"]
    failures = []
    for method, path, body, expected in _writes(ids):
        for principal, status in expected.items():
            before = fingerprint(database_url, ids)
            headers = {"Idempotency-Key": uuid.uuid4().hex}
            resp = clients[principal].request(method, path, json=body, headers=headers)
            if resp.status_code != status:
                failures.append(f"{principal} {method} {path}: {resp.status_code} != {status}")
            elif resp.headers["Content-Type"] != "application/problem+json":
                failures.append(f"{principal} {method} {path}: not problem+json")
            if fingerprint(database_url, ids) != before:
                failures.append(f"{principal} {method} {path} changed the database")
    assert not failures


def test_events_for_another_operators_lot_are_rejected_and_change_nothing(
    world: dict[str, Any], database_url: str
) -> None:
    before = fingerprint(database_url, world["ids"])
    resp = world["clients"]["op_b"].post("/v1/events", json=_event(world["ids"]))
    assert resp.status_code == 200
    body = resp.json()
    assert body["accepted"] == 0 and [r["code"] for r in body["rejected"]] == ["unknown-lot"]
    assert fingerprint(database_url, world["ids"]) == before


MASS_ASSIGNMENT = [
    ("op_a", "POST", "/v1/lots", lambda ids: {**_lot_body("mass"), "operator_id": ids["op_b"]}),
    ("op_a", "POST", "/v1/lots", lambda ids: {**_lot_body("mass"), "id": str(uuid.uuid4())}),
    ("op_a", "PATCH", "/v1/lots/{lot_a}", lambda ids: {"operator_id": ids["op_b"]}),
    ("op_a", "PATCH", "/v1/lots/{lot_a}", lambda ids: {"capacity": {"standard": 999}}),
    ("op_a", "PATCH", "/v1/lots/{lot_a}", lambda ids: {"created_at": "2020-01-01T00:00:00Z"}),
    (
        "drv_a",
        "POST",
        "/v1/reservations",
        lambda ids: {
            "lot_id": ids["lot_a"],
            "space_type": "standard",
            "plate": "浙C1",
            "start": ids["start"],
            "end": ids["end"],
            "status": "active",
        },
    ),
    (
        "drv_a",
        "POST",
        "/v1/reservations",
        lambda ids: {
            "lot_id": ids["lot_a"],
            "space_type": "standard",
            "plate": "浙C1",
            "start": ids["start"],
            "end": ids["end"],
            "price": {"amount": "0.00", "currency": "CNY"},
        },
    ),
    (
        "drv_a",
        "POST",
        "/v1/reservations",
        lambda ids: {
            "lot_id": ids["lot_a"],
            "space_type": "standard",
            "plate": "浙C1",
            "start": ids["start"],
            "end": ids["end"],
            "driver_id": ids["drv_b"],
        },
    ),
    (
        "anonymous",
        "POST",
        "/v1/drivers",
        lambda ids: {"email": "mass@example.com", "password": "long enough", "id": ids["drv_a"]},
    ),
    (
        "city_a",
        "POST",
        "/v1/city/subscriptions",
        lambda ids: {
            "url": "http://127.0.0.1:9/x",
            "events": ["lot.full"],
            "city_id": ids["city_b"],
        },
    ),
]


@pytest.mark.parametrize(
    ("principal", "method", "path", "make"),
    MASS_ASSIGNMENT,
    ids=[f"{p} {m} {u} #{i}" for i, (p, m, u, _) in enumerate(MASS_ASSIGNMENT)],
)
def test_mass_assignment_is_refused(
    world: dict[str, Any], database_url: str, principal: str, method: str, path: str, make: Any
) -> None:
    ids = world["ids"]
    before = fingerprint(database_url, ids)
    resp = world["clients"][principal].request(
        method, _fill(path, ids), json=make(ids), headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    assert resp.status_code == 422, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert fingerprint(database_url, ids) == before


def test_the_owner_may_and_the_fingerprint_sees_it(
    world: dict[str, Any], database_url: str
) -> None:
    """Positive control: the same calls by the owners succeed and do change the database."""
    clients, ids = world["clients"], world["ids"]
    before = fingerprint(database_url, ids)
    assert clients["op_a"].patch(f"/v1/lots/{ids['lot_a']}", json={"name": "renamed"}).ok
    after_patch = fingerprint(database_url, ids)
    assert after_patch["lots"] != before["lots"]
    assert clients["drv_a"].post(f"/v1/reservations/{ids['res_a']}/cancel").status_code == 200
    assert fingerprint(database_url, ids)["reservations"] != after_patch["reservations"]
    assert clients["city_a"].delete(f"/v1/city/subscriptions/{ids['sub_a']}").status_code == 204
    assert clients["op_a"].delete(f"/v1/lots/{ids['lot_b']}").status_code == 404
    assert clients["op_b"].delete(f"/v1/lots/{ids['lot_b']}").status_code == 204
    assert clients["anonymous"].get(f"/v1/lots/{ids['lot_b']}").status_code == 404
