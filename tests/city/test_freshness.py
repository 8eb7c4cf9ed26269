"""Freshness of the city snapshot, measured through the real processes under load.

Operators post event batches through the gateway (``POST /v1/events``) from several threads
while a probe lot's space is toggled one event at a time; after each acknowledgement the city
polls ``GET /v1/city/snapshot`` until the probe lot shows the new state. The time from the
acknowledgement to the answer that shows it must stay under a second at the 99th percentile.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from tests.stack import Client, Stack

PROBES = 60
LOAD_THREADS = 3
LOAD_LOTS = 6
LOAD_SPACES = 50
BATCH = 100


def _lot(operator: Client, district: str, spaces: int) -> str:
    resp = operator.post(
        "/v1/lots",
        json={
            "name": f"fresh {uuid.uuid4().hex[:6]}",
            "location": {"lat": 30.25, "lon": 120.16},
            "district": district,
            "spaces": [{"id": f"S-{i:03d}", "type": "standard"} for i in range(spaces)],
            "tariff": {"currency": "CNY", "per_hour": "5.00"},
        },
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


_clock = itertools.count()


def _event(lot_id: str, space_id: str, occupied: bool) -> dict[str, Any]:
    # strictly increasing observed times, so no event is stale against the one before it
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    return {
        "id": f"fresh-{uuid.uuid4().hex}-{next(_clock)}",
        "lot_id": lot_id,
        "type": "space",
        "space_id": space_id,
        "occupied": occupied,
        "observed_at": at,
    }


def test_snapshot_reflects_accepted_events_within_a_second_under_load(
    stack: Stack, new_operator: Any, new_city: Any, record_property: Any
) -> None:
    _, operator = new_operator("freshness")
    _, city = new_city("freshness")
    district = f"fresh{uuid.uuid4().hex[:6]}"
    probe = _lot(operator, district, 1)
    load_lots = [_lot(operator, district, LOAD_SPACES) for _ in range(LOAD_LOTS)]

    stop = threading.Event()
    posted = [0] * LOAD_THREADS
    failures: list[str] = []

    def load(n: int) -> None:
        client = Client(stack.url, operator.session.headers["Authorization"].split(" ", 1)[1])
        for i in range(100_000):  # bounded; stopped by the probe loop long before
            if stop.is_set():
                return
            lot_id = load_lots[(n + i) % LOAD_LOTS]
            batch = [
                _event(lot_id, f"S-{(i * 7 + k) % LOAD_SPACES:03d}", (i + k) % 2 == 0)
                for k in range(BATCH)
            ]
            resp = client.post("/v1/events", json={"events": batch})
            if resp.status_code != 200:
                failures.append(f"{resp.status_code} {resp.text[:200]}")
                return
            posted[n] += resp.json()["accepted"]

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(LOAD_THREADS)]
    for t in threads:
        t.start()
    latencies: list[float] = []
    try:
        for i in range(PROBES):
            occupied = i % 2 == 0
            resp = operator.post("/v1/events", json={"events": [_event(probe, "S-000", occupied)]})
            assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
            acked = time.monotonic()
            for _ in range(1000):  # bounded polling, one snapshot request after another
                snap = city.get("/v1/city/snapshot")
                seen = time.monotonic()
                assert snap.status_code == 200
                lots = {lot["id"]: lot for lot in snap.json()["lots"]}
                if lots[probe]["occupied"] == int(occupied):
                    latencies.append(seen - acked)
                    break
                assert seen - acked < 10, "the snapshot never showed the event"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:3]
    assert sum(posted) > 0, "the load threads posted events while the probes ran"
    latencies.sort()
    p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]
    p50 = latencies[len(latencies) // 2]
    record_property("snapshot_freshness_p99_s", round(p99, 4))
    record_property("snapshot_freshness_p50_s", round(p50, 4))
    record_property("load_events_accepted", sum(posted))
    print(
        f"\ncity snapshot freshness under load: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        f" over {len(latencies)} probes; {sum(posted)} load events accepted meanwhile"
    )
    assert len(latencies) == PROBES
    assert p99 < 1.0
