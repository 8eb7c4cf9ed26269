"""Reservation lifecycle driven by gate events: ``confirmed`` -> ``active`` -> ``completed``.

The ingestion service calls :func:`apply_gate_events` inside the transaction that commits
accepted entry/exit events, so a reservation's state moves with the event that moved it. After
that transaction commits, the caller calls :func:`forget_reserved` for the lots of those events,
so the lots' ``reserved`` counts are recomputed on the next read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis

from services.common.reserved import reserved_key
from services.reservations.domain import EARLY_ARRIVAL

log = logging.getLogger("parking.reservations")


@dataclass(frozen=True, slots=True)
class GateEvent:
    lot_id: str
    type: str  # "entry" or "exit"
    plate_hash: bytes
    observed_at: datetime


# An entry activates the confirmed reservation of its plate at its lot whose window (opened
# EARLY_ARRIVAL before the start) holds the entry; if two do, the one starting first. One
# reservation takes the earliest of the entries that chose it.
_ARRIVE = """
WITH e AS (
    SELECT * FROM unnest(%(lots)s::uuid[], %(plates)s::bytea[], %(at)s::timestamptz[])
        WITH ORDINALITY AS e(lot_id, plate_hash, observed_at, n)
), per_event AS (
    SELECT DISTINCT ON (e.n) e.n, r.id, e.observed_at
    FROM e JOIN reservations r
      ON r.lot_id = e.lot_id AND r.plate_hash = e.plate_hash AND r.status = 'confirmed'
     AND e.observed_at >= r.starts_at - %(early)s::interval AND e.observed_at < r.ends_at
    ORDER BY e.n, r.starts_at, r.id
), per_reservation AS (
    SELECT DISTINCT ON (id) id, observed_at FROM per_event ORDER BY id, observed_at
)
UPDATE reservations r SET status = 'active', arrived_at = p.observed_at
FROM per_reservation p WHERE r.id = p.id AND r.status = 'confirmed'
"""

# An exit completes the active reservation of its plate at its lot that it follows.
_DEPART = """
WITH e AS (
    SELECT * FROM unnest(%(lots)s::uuid[], %(plates)s::bytea[], %(at)s::timestamptz[])
        AS e(lot_id, plate_hash, observed_at)
), per_reservation AS (
    SELECT DISTINCT ON (r.id) r.id, e.observed_at
    FROM e JOIN reservations r
      ON r.lot_id = e.lot_id AND r.plate_hash = e.plate_hash AND r.status = 'active'
     AND e.observed_at >= r.arrived_at
    ORDER BY r.id, e.observed_at
)
UPDATE reservations r SET status = 'completed', departed_at = p.observed_at
FROM per_reservation p WHERE r.id = p.id AND r.status = 'active'
"""


def _arrays(events: list[GateEvent]) -> dict[str, Any]:
    return {
        "lots": [e.lot_id for e in events],
        "plates": [e.plate_hash for e in events],
        "at": [e.observed_at for e in events],
    }


def apply_gate_events(conn: psycopg.Connection[Any], *, events: list[GateEvent]) -> int:
    """Mark reservations active/completed for the plates in ``events``; return rows changed.

    Entries are applied before exits, so a batch holding a car's entry and exit completes its
    reservation. Two statements whatever the batch size.
    """
    entries = [e for e in events if e.type == "entry" and e.plate_hash]
    exits = [e for e in events if e.type == "exit" and e.plate_hash]
    changed = 0
    if entries:
        changed += conn.execute(_ARRIVE, {**_arrays(entries), "early": EARLY_ARRIVAL}).rowcount
    if exits:
        changed += conn.execute(_DEPART, _arrays(exits)).rowcount
    return changed


def forget_reserved(client: redis.Redis, lot_ids: Iterable[str]) -> None:
    """Drop the cached ``reserved`` counts of ``lot_ids``; call after the change commits.

    The writers' side of the cache contract in :mod:`services.common.reserved`. A Redis outage
    must not fail a change PostgreSQL has already committed: the keys Redis refused are logged
    and deleted again in the background until it answers, so an outage does not leave a count
    stale for the cache's whole lifetime.
    """
    keys = {reserved_key(str(lot_id)) for lot_id in lot_ids}
    if keys:
        _invalidations.delete(client, keys)


class _Invalidations:
    """Deletes of cached counts that Redis refused, retried every ``RETRY_EVERY_S`` for at most
    ``RETRY_FOR_S`` (past the longest the availability service caches a count, a retry is moot)."""

    RETRY_EVERY_S = 1.0
    RETRY_FOR_S = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._retrying = False

    def pending(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def delete(self, client: redis.Redis, keys: set[str]) -> None:
        with self._lock:
            keys |= self._pending
            self._pending.clear()
        try:
            client.delete(*sorted(keys))
        except redis.RedisError as exc:
            log.warning(
                "could not drop %d cached reserved counts: %s (retrying)",
                len(keys),
                type(exc).__name__,
            )
            self._retry_later(client, keys)

    def _retry_later(self, client: redis.Redis, keys: set[str]) -> None:
        with self._lock:
            self._pending |= keys
            if self._retrying:
                return
            self._retrying = True
        threading.Thread(
            target=self._retry, args=(client,), name="forget-reserved", daemon=True
        ).start()

    def _retry(self, client: redis.Redis) -> None:
        deadline = time.monotonic() + self.RETRY_FOR_S
        while time.monotonic() < deadline:
            time.sleep(self.RETRY_EVERY_S)  # pacing the retries, not waiting for a condition
            with self._lock:
                keys, self._pending = self._pending, set()
                if not keys:
                    self._retrying = False  # under the lock: a key added later starts a thread
                    return
            try:
                client.delete(*sorted(keys))
            except redis.RedisError:
                with self._lock:
                    self._pending |= keys
            else:
                log.info("dropped %d cached reserved counts after a Redis outage", len(keys))
        with self._lock:
            log.error("gave up dropping %d cached reserved counts", len(self._pending))
            self._pending.clear()
            self._retrying = False


_invalidations = _Invalidations()
