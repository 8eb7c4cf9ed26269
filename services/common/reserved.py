"""Reserved spaces "now": confirmed reservations whose window covers now, and their Redis cache.

A reservation holds a space while it is ``confirmed`` (the car has not arrived) and
``starts_at <= now < ends_at``. The availability service caches the counts per lot in the hash
``reserved:{lot_id}`` (space type -> count) until the next window boundary (capped).

Contract for writers of reservations: after committing anything that changes a lot's confirmed
reservations (create, cancel, arrival, no-show, ...), ``DEL reserved_key(lot_id)``
(``services.reservations.lifecycle.forget_reserved``, which retries a DEL Redis refused).
Readers fill the cache under a lease (:func:`lease` / :func:`store`): a fill computed from a
snapshot older than that DEL is never written, so a DEL is never undone.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import redis

LEASE_FIELD = "_lease"
FILLED_FIELD = "_ok"
UNTIL_FIELD = "_until"  # when the fill expires, in ms since the epoch by Redis' clock
LEASE_TTL_MS = 5000


def reserved_key(lot_id: str) -> str:
    return f"reserved:{lot_id}"


@dataclass(frozen=True, slots=True)
class Reserved:
    """A lot's reserved counts per space type and the next instant they may change."""

    counts: dict[str, int] = field(default_factory=dict)
    next_change: datetime | None = None


def reserved_snapshot(
    conn: psycopg.Connection[Any], lot_ids: Sequence[str], now: datetime
) -> dict[str, Reserved]:
    """Reserved counts at ``now`` and the next window boundary after it, for every lot id."""
    ids = [str(uuid.UUID(i)) for i in lot_ids]
    out: dict[str, Reserved] = {i: Reserved() for i in ids}
    if not ids:
        return out
    rows = conn.execute(
        "SELECT lot_id::text, space_type,"
        " count(*) FILTER (WHERE starts_at <= %(now)s),"
        " min(CASE WHEN starts_at > %(now)s THEN starts_at ELSE ends_at END)"
        " FROM reservations"
        " WHERE lot_id = ANY(%(ids)s::uuid[]) AND status = 'confirmed' AND ends_at > %(now)s"
        " GROUP BY lot_id, space_type",
        {"ids": ids, "now": now},
    ).fetchall()
    for lot_id, space_type, count, next_change in rows:
        current = out[lot_id]
        counts = dict(current.counts)
        if count:
            counts[space_type] = int(count)
        nxt = current.next_change
        if next_change is not None and (nxt is None or next_change < nxt):
            nxt = next_change
        out[lot_id] = Reserved(counts, nxt)
    return out


def reserved_now(
    conn: psycopg.Connection[Any], lot_ids: Sequence[str], now: datetime
) -> dict[str, dict[str, int]]:
    """``{lot_id: {space_type: reserved}}`` at ``now`` (types with none are left out)."""
    return {k: v.counts for k, v in reserved_snapshot(conn, lot_ids, now).items()}


def decode(raw: Mapping[str, str]) -> dict[str, int] | None:
    """The cached counts, or None when the hash holds no finished fill (missing or leased)."""
    if FILLED_FIELD not in raw:
        return None
    return {k: int(v) for k, v in raw.items() if not k.startswith("_")}


def until_ms(raw: Mapping[str, str]) -> float | None:
    """When a finished fill expires (ms since the epoch), if it says (fills before it did not)."""
    until = raw.get(UNTIL_FIELD)
    return float(until) if until is not None and FILLED_FIELD in raw else None


# KEYS: the reserved hashes.  ARGV: token, lease ms.  Takes a lease on every key not filled.
_LEASE = """
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], '_ok') == 0 then
    redis.call('HSET', KEYS[i], '_lease', ARGV[1])
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
  end
end
return 1
"""

# KEYS: reserved hashes.  ARGV: token, then per key: ttl ms, n, and n type/count pairs.  Writes a
# key only if our lease on it still stands (a DEL by a reservation writer in between removed it),
# with the instant it expires (a reader keeping the counts knows when to stop).
_STORE = """
local a = 2
local written = 0
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for i = 1, #KEYS do
  local ttl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local pairs_at = a + 2
  a = a + 2 + 2 * n
  if redis.call('HGET', KEYS[i], '_lease') == ARGV[1] then
    redis.call('DEL', KEYS[i])
    redis.call('HSET', KEYS[i], '_ok', '1')
    for j = 0, n - 1 do
      redis.call('HSET', KEYS[i], ARGV[pairs_at + 2 * j], ARGV[pairs_at + 2 * j + 1])
    end
    redis.call('HSET', KEYS[i], '_until', now_ms + ttl)
    redis.call('PEXPIRE', KEYS[i], ttl)
    written = written + 1
  end
end
return written
"""


def lease(client: redis.Redis, lot_ids: Sequence[str]) -> str:
    """Take a fill lease on the cache of ``lot_ids``; read PostgreSQL only after this."""
    token = uuid.uuid4().hex
    if lot_ids:
        client.register_script(_LEASE)(
            keys=[reserved_key(i) for i in lot_ids], args=[token, LEASE_TTL_MS]
        )
    return token


def store(
    client: redis.Redis,
    token: str,
    snapshot: Mapping[str, Reserved],
    now: datetime,
    max_age_s: float,
) -> None:
    """Cache ``snapshot`` (read after :func:`lease`) until each lot's next boundary, or for
    50-100% of ``max_age_s`` (spread, so the keys of lots filled together expire apart)."""
    if not snapshot:
        return
    keys: list[str] = []
    args: list[Any] = [token]
    for lot_id, held in snapshot.items():
        ttl_s = max_age_s * (0.5 + 0.5 * random.random())
        if held.next_change is not None:
            ttl_s = min(ttl_s, (held.next_change - now).total_seconds())
        keys.append(reserved_key(lot_id))
        args += [max(1, int(ttl_s * 1000)), len(held.counts)]
        for space_type, count in held.counts.items():
            args += [space_type, count]
    client.register_script(_STORE)(keys=keys, args=args)
