"""Events accepted by the ingestion service, seen by availability on the very next request."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from tests.availability import facts
from tests.stack import Client, Stack


def _lot(operator: Client, lat: float, lon: float) -> str:
    resp = operator.post(
        "/v1/lots",
        json={
            "name": "Yunqi Town P1",
            "location": {"lat": lat, "lon": lon},
            "district": "xihu",
            "opening_hours": "24/7",
            "capacity": {"standard": 5, "ev": 2},
            "tariff": facts.TARIFF,
        },
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _post(operator: Client, *events: dict[str, Any]) -> dict[str, Any]:
    resp = operator.post("/v1/events", json={"events": list(events)})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_an_accepted_event_is_visible_on_the_very_next_request(
    stack: Stack, anonymous: Client, new_operator: Any
) -> None:
    _, operator = new_operator()
    lat, lon = facts.somewhere()
    lot_id = _lot(operator, lat, lon)
    found = anonymous.get("/v1/lots", params={"lat": lat, "lon": lon, "radius_m": 100}).json()
    assert [i["id"] for i in found["items"]] == [lot_id]  # a new lot is searchable at once
    base = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(1, 6):
        observed = base + timedelta(seconds=n)
        result = _post(
            operator,
            {
                "id": f"gate-{n}",
                "lot_id": lot_id,
                "type": "entry",
                "space_type": "standard",
                "observed_at": observed.isoformat(),
            },
        )
        assert result["accepted"] == 1, result
        body = anonymous.get(f"/v1/lots/{lot_id}").json()
        assert body["occupied"] == {"ev": 0, "standard": n}
        assert body["free"]["standard"] == 5 - n
        assert datetime.fromisoformat(body["updated_at"]) == observed
    assert (body["free_total"], body["status"]) == (2, "open")  # 5 of 7 in use
    observed = base + timedelta(seconds=30)
    _post(
        operator,
        {
            "id": "count-1",
            "lot_id": lot_id,
            "type": "count",
            "occupied": {"standard": 1, "ev": 2},
            "observed_at": observed.isoformat(),
        },
    )
    body = anonymous.get(f"/v1/lots/{lot_id}").json()
    assert body["occupied"] == {"ev": 2, "standard": 1} and body["free_total"] == 4
    found = anonymous.get(
        "/v1/lots", params={"lat": lat, "lon": lon, "radius_m": 100, "space_type": "ev"}
    ).json()
    assert found["items"] == []  # no EV space free any more


def test_an_accepted_event_is_pushed_to_watchers_within_200_ms(
    stack: Stack, new_operator: Any
) -> None:
    _, operator = new_operator()
    lat, lon = facts.somewhere()
    lot_id = _lot(operator, lat, lon)
    with facts.event_stream(f"{stack.url}/v1/lots/{lot_id}/stream") as events:
        events.next_event()
        base = datetime.now(UTC) - timedelta(minutes=1)
        for n in range(1, 4):
            sent = time.monotonic()
            _post(
                operator,
                {
                    "id": f"in-{n}",
                    "lot_id": lot_id,
                    "type": "entry",
                    "space_type": "ev" if n == 3 else "standard",
                    "observed_at": (base + timedelta(seconds=n)).isoformat(),
                },
            )
            answered = time.monotonic()
            event = events.next_event(timeout=2)
            assert time.monotonic() - answered < 0.2, "pushed more than 200 ms after the answer"
            assert time.monotonic() - sent < 1.0
            data = orjson.loads(event["data"])
            assert sum(data["occupied"].values()) == n
