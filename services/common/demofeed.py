"""The demo's sensors and gates: live occupancy for the demo lots, through the public API.

``parking up`` seeds about 50 demo lots. Without events each would read empty and, as the
availability service says of a lot without data, ``unknown``. The feed plays the devices of
their operators, over ``POST /v1/events`` with the operators' keys, like any operator's hub:

- it first reports every lot's state: a space event per sensor, and a count per gate lot. A lot
  that has a state keeps it; a new one starts at a share of its capacity drawn per lot, some
  full;
- then every tick it moves about a fifth of the lots by one event each: a sensor seeing its space
  taken or freed, an entry or an exit. Each lot's target share drifts a little at every tick, and
  a move takes a space with the probability of that target, so a lot's occupancy follows it;
- now and then, and after a failure, it starts again: it reads the lots anew (a lot added or
  deleted since) and reports them.

It keeps what it sent as its model of the lots: it sends no exit from an empty lot, and no entry
into a full one, and a test can compare the platform's counts with the model.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
import urllib3

log = logging.getLogger("parking.demofeed")

BATCH = 1000  # the most events API.md allows in a batch
SHARES = (0.2, 0.4, 0.55, 0.7, 0.85, 0.93, 1.0)  # a new lot's first share of its capacity
DRIFT = 0.03  # how far a lot's target share moves in a tick (standard deviation)


class FeedError(Exception):
    """The gateway refused a call, or answered what the feed did not send."""


@dataclass
class DemoLot:
    """The feed's model of one lot: the state of each space, or the count of each type."""

    id: str
    target: float
    spaces: dict[str, bool] = field(default_factory=dict)
    occupied: dict[str, int] = field(default_factory=dict)  # lots counted at their gates
    capacity: dict[str, int] = field(default_factory=dict)


class DemoFeed:
    """Live events for every lot of the operators whose ``keys`` it holds, at ``url``."""

    def __init__(
        self, url: str, keys: list[str], *, seed: int | None = None, moves: float = 0.2
    ) -> None:
        self.url = url.rstrip("/")
        self.keys = keys
        self.moves = moves  # the share of the lots that move in a tick
        self.rng = random.Random(seed)
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(total=10.0), retries=False)
        self.run_id = uuid.uuid4().hex[:12]  # event ids stay unique across runs of the feed
        self.seq = 0
        self.lots: dict[str, list[DemoLot]] = {}  # by operator key

    def start(self) -> int:
        """Read every lot of the operators and report its state; the events accepted."""
        self.lots = {
            key: [self._model(key, lot_id) for lot_id in self._lot_ids(key)] for key in self.keys
        }
        now = _now()
        accepted = 0
        for key, lots in self.lots.items():
            accepted += self._post(key, [e for lot in lots for e in self._report(lot, now)])
        return accepted

    def tick(self) -> int:
        """Move some lots by an event each; the events accepted."""
        now = _now()
        accepted = 0
        for key, lots in self.lots.items():
            events = []
            for lot in lots:
                lot.target = min(1.0, max(0.05, lot.target + self.rng.gauss(0.0, DRIFT)))
                if self.rng.random() < self.moves:
                    events.extend(self._move(lot, now))
            accepted += self._post(key, events)
        return accepted

    def run(self, stop: threading.Event, tick_s: float = 5.0, restart_every: int = 60) -> None:
        """Report, then tick every ``tick_s`` until ``stop`` is set. Every ``restart_every``
        ticks, and after a failure (the gateway restarting, a lot deleted), start again: read
        the lots (new ones too) and report them."""
        ticks = 0
        while not stop.is_set():
            try:
                if ticks % restart_every == 0:
                    self.start()
                else:
                    self.tick()
                ticks += 1
            except (FeedError, urllib3.exceptions.HTTPError, OSError, KeyError, ValueError) as exc:
                log.warning("demo feed: %s; starting again", exc)
                ticks = 0
            stop.wait(tick_s)

    def _lot_ids(self, key: str) -> list[str]:
        ids: list[str] = []
        cursor = ""
        while True:
            page = self._call("GET", f"/v1/lots?mine=1&limit=500{cursor}", key)
            ids.extend(item["id"] for item in page["items"])
            if not page["next_cursor"]:
                return ids
            cursor = f"&cursor={quote(page['next_cursor'], safe='')}"

    def _model(self, key: str, lot_id: str) -> DemoLot:
        """The lot as its owner sees it; a lot that never had a state gets one at random."""
        view = self._call("GET", f"/v1/lots/{lot_id}?mine=1", key)
        fresh = view.get("live_updated_at") is None
        lot = DemoLot(lot_id, self.rng.choice(SHARES))
        if "spaces" in view:
            lot.spaces = {
                s["id"]: self.rng.random() < lot.target if fresh else bool(s["occupied"])
                for s in view["spaces"]
            }
            if not fresh and lot.spaces:
                lot.target = sum(lot.spaces.values()) / len(lot.spaces)
            return lot
        lot.capacity = {t: n for t, n in view["capacity"].items() if n > 0}
        if fresh:
            lot.occupied = {t: round(n * lot.target) for t, n in lot.capacity.items()}
        else:
            lot.occupied = {t: int(view["occupied"].get(t, 0)) for t in lot.capacity}
            lot.target = sum(lot.occupied.values()) / max(1, sum(lot.capacity.values()))
        return lot

    def _report(self, lot: DemoLot, now: str) -> list[dict[str, Any]]:
        if lot.spaces:
            return [
                self._event(lot.id, now, type="space", space_id=space_id, occupied=occupied)
                for space_id, occupied in lot.spaces.items()
            ]
        return [self._event(lot.id, now, type="count", occupied=dict(lot.occupied))]

    def _move(self, lot: DemoLot, now: str) -> list[dict[str, Any]]:
        take = self.rng.random() < lot.target
        if lot.spaces:
            candidates = [s for s, occupied in lot.spaces.items() if occupied != take]
            if not candidates:
                return []
            space_id = self.rng.choice(candidates)
            lot.spaces[space_id] = take
            return [self._event(lot.id, now, type="space", space_id=space_id, occupied=take)]
        types = list(lot.capacity)
        space_type = self.rng.choices(types, weights=[lot.capacity[t] for t in types])[0]
        if take and lot.occupied[space_type] < lot.capacity[space_type]:
            lot.occupied[space_type] += 1
            return [self._event(lot.id, now, type="entry", space_type=space_type)]
        if not take and lot.occupied[space_type] > 0:
            lot.occupied[space_type] -= 1
            return [self._event(lot.id, now, type="exit", space_type=space_type)]
        return []

    def _event(self, lot_id: str, now: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {
            "id": f"demo-{self.run_id}-{self.seq}",
            "lot_id": lot_id,
            **fields,
            "observed_at": now,
        }

    def _post(self, key: str, events: list[dict[str, Any]]) -> int:
        """Post ``events`` in batches; each must be accepted, or the model no longer holds."""
        accepted = 0
        for at in range(0, len(events), BATCH):
            batch = events[at : at + BATCH]
            answer = self._call("POST", "/v1/events", key, {"events": batch})
            if answer["accepted"] != len(batch):
                raise FeedError(f"{len(batch)} events sent, the answer: {answer}")
            accepted += answer["accepted"]
        return accepted

    def _call(self, method: str, path: str, key: str, body: Any = None) -> Any:
        resp = self.http.request(
            method,
            self.url + path,
            body=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        if resp.status != 200:
            raise FeedError(f"{method} {path}: {resp.status} {resp.data[:300]!r}")
        return orjson.loads(resp.data)


def _now() -> str:
    return datetime.now(UTC).isoformat()
