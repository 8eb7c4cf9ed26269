"""The demo feed (services/common/demofeed.py) through the real gateway and services.

Every event it sends must be accepted (it raises otherwise), and afterwards the platform's
counts must be the feed's model of the lots: the owner's view in PostgreSQL, and the public
detail from Redis' live state. A feed started again begins from the lots' state, not a new draw.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from services.common.demofeed import DemoFeed, DemoLot
from tests.stack import Client, Stack, wait_for

pytestmark = pytest.mark.e2e

TARIFF = {"currency": "CNY", "per_hour": "5.00"}


def _register(operator: Client, body: dict[str, Any]) -> str:
    resp = operator.post(
        "/v1/lots",
        json={"location": {"lat": 30.27, "lon": 120.15}, "district": "xihu", "tariff": TARIFF}
        | body,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _counts(lot: DemoLot) -> dict[str, int]:
    """The occupied count per type that the model says, over the types the lot has."""
    if lot.capacity:
        return dict(lot.occupied)
    return {
        "standard": sum(lot.spaces[s] for s in lot.spaces if s != "S0"),
        "ev": int(lot.spaces["S0"]),
    }


def test_the_feed_reports_and_moves_lots_and_the_platform_counts_as_its_model(
    stack: Stack, admin: Client, anonymous: Client
) -> None:
    created = admin.post("/v1/admin/operators", json={"name": "Feed Co"})
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]
    operator = Client(stack.url, key)
    space_lot = _register(
        operator,
        {
            "name": "Feed spaces",
            "spaces": [{"id": f"S{i}", "type": "ev" if i == 0 else "standard"} for i in range(8)],
        },
    )
    gate_lot = _register(
        operator, {"name": "Feed gates", "capacity": {"standard": 12, "ev": 3, "accessible": 0}}
    )

    feed = DemoFeed(stack.url, [key], seed=3, moves=1.0)
    assert feed.start() == 8 + 1  # a space event per sensor, a count for the gate lot
    first = {lot.id: (dict(lot.spaces), dict(lot.occupied)) for lot in feed.lots[key]}
    moved = sum(feed.tick() for _ in range(30))
    model = {lot.id: lot for lot in feed.lots[key]}
    assert set(model) == {space_lot, gate_lot}
    assert moved > 0
    assert {lot.id: (lot.spaces, lot.occupied) for lot in model.values()} != first
    gates = model[gate_lot]
    assert set(gates.capacity) == {"standard", "ev"}  # no events for a type the lot lacks
    assert all(0 <= gates.occupied[t] <= gates.capacity[t] for t in gates.capacity)

    view = operator.get(f"/v1/lots/{space_lot}?mine=1").json()
    assert {s["id"]: s["occupied"] for s in view["spaces"]} == model[space_lot].spaces
    for lot_id in (space_lot, gate_lot):
        owner = operator.get(f"/v1/lots/{lot_id}?mine=1").json()
        assert {t: n for t, n in owner["occupied"].items() if n or t in _counts(model[lot_id])} == (
            _counts(model[lot_id])
        )
        assert owner["live_updated_at"] is not None
        public = anonymous.get(f"/v1/lots/{lot_id}")
        assert public.status_code == 200, public.text
        assert {t: public.json()["occupied"].get(t, 0) for t in _counts(model[lot_id])} == (
            _counts(model[lot_id])
        )
        assert public.json()["status"] != "unknown"

    # started again, a feed takes the lots as they are
    again = DemoFeed(stack.url, [key], seed=99)
    assert again.start() == 8 + 1
    assert {lot.id: (lot.spaces, lot.occupied) for lot in again.lots[key]} == {
        lot.id: (lot.spaces, lot.occupied) for lot in model.values()
    }


def test_the_feed_starts_again_when_a_lot_goes_and_carries_on(stack: Stack, admin: Client) -> None:
    created = admin.post("/v1/admin/operators", json={"name": "Feed Again Co"})
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]
    operator = Client(stack.url, key)
    gone, kept = (
        _register(operator, {"name": f"Feed gates {n}", "capacity": {"standard": 40}})
        for n in (1, 2)
    )
    feed = DemoFeed(stack.url, [key], seed=5, moves=1.0)
    stop = threading.Event()
    runner = threading.Thread(target=feed.run, args=(stop, 0.05, 10_000))
    runner.start()
    try:
        wait_for(lambda: feed.seq > 10, timeout=30, interval=0.05, what="the feed running")
        assert {lot.id for lot in feed.lots[key]} == {gone, kept}
        assert operator.delete(f"/v1/lots/{gone}").status_code == 204
        # its next event for the deleted lot is refused: the feed reads the lots again
        wait_for(
            lambda: [lot.id for lot in feed.lots[key]] == [kept],
            timeout=30,
            interval=0.05,
            what="the feed started again without the deleted lot",
        )
        sent = feed.seq
        wait_for(lambda: feed.seq > sent + 5, timeout=30, interval=0.05, what="the feed going on")
    finally:
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
