"""The live state in Redis: the contract between its writer (ingestion) and readers.

Redis holds only what PostgreSQL can rebuild (``parking rebuild-cache``):

- ``lot:{id}``        hash: ``v`` version, ``u`` updated_at (RFC 3339), ``d`` district,
                      ``o:{type}`` occupied and ``c:{type}`` capacity per space type
- ``lotmeta:{id}``    string: the lot's registry summary as JSON (name, location, tariff...)
- ``lots:geo``        geo set of every lot id, for nearby search
- ``district:{name}`` hash: ``o`` occupied, ``c`` capacity, summed over the district's lots
- ``city``            hash: ``o`` occupied, ``c`` capacity, summed over every lot
- ``districts``       set of district names
- channel ``lot-changes``: one JSON message per applied change ``{"lot_id", "v", "u", "o", "c"}``

Every write of a lot's counts goes through one Lua script, so the lot, its district and the city
change atomically together, and a write carrying an older version than Redis holds is ignored:
concurrent writers cannot move the live state backwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.exceptions import NoScriptError

GEO_KEY = "lots:geo"
CITY_KEY = "city"
DISTRICTS_KEY = "districts"
CHANGES_CHANNEL = "lot-changes"


def lot_key(lot_id: str) -> str:
    return f"lot:{lot_id}"


def meta_key(lot_id: str) -> str:
    return f"lotmeta:{lot_id}"


def district_key(district: str) -> str:
    return f"district:{district}"


# KEYS: lot, city, districts-set.  ARGV: lot_id, version, updated_at, district, n_types,
# then n_types triples (type, occupied, capacity).  Returns 1 if applied, 0 if older.
_APPLY = """
local lot = KEYS[1]
local version = tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', lot, 'v') or '-1')
if current >= version then return 0 end
local old = redis.call('HGETALL', lot)
local old_o, old_c, old_d = 0, 0, nil
for i = 1, #old, 2 do
  local f = old[i]
  if string.sub(f, 1, 2) == 'o:' then old_o = old_o + tonumber(old[i + 1])
  elseif string.sub(f, 1, 2) == 'c:' then old_c = old_c + tonumber(old[i + 1])
  elseif f == 'd' then old_d = old[i + 1] end
end
local district = ARGV[4]
local n = tonumber(ARGV[5])
local new_o, new_c = 0, 0
redis.call('DEL', lot)
local fields = {'v', ARGV[2], 'u', ARGV[3], 'd', district}
for i = 0, n - 1 do
  local t, o, c = ARGV[6 + 3 * i], tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
  new_o = new_o + o
  new_c = new_c + c
  table.insert(fields, 'o:' .. t); table.insert(fields, o)
  table.insert(fields, 'c:' .. t); table.insert(fields, c)
end
redis.call('HSET', lot, unpack(fields))
if old_d then
  redis.call('HINCRBY', 'district:' .. old_d, 'o', 0 - old_o)
  redis.call('HINCRBY', 'district:' .. old_d, 'c', 0 - old_c)
  redis.call('HINCRBY', KEYS[2], 'o', 0 - old_o)
  redis.call('HINCRBY', KEYS[2], 'c', 0 - old_c)
end
redis.call('HINCRBY', 'district:' .. district, 'o', new_o)
redis.call('HINCRBY', 'district:' .. district, 'c', new_c)
redis.call('HINCRBY', KEYS[2], 'o', new_o)
redis.call('HINCRBY', KEYS[2], 'c', new_c)
redis.call('SADD', KEYS[3], district)
local o, c = {}, {}
for i = 0, n - 1 do
  o[ARGV[6 + 3 * i]] = tonumber(ARGV[7 + 3 * i])
  c[ARGV[6 + 3 * i]] = tonumber(ARGV[8 + 3 * i])
end
local message = {lot_id = ARGV[1], v = version, u = ARGV[3], o = o, c = c}
redis.call('PUBLISH', 'lot-changes', cjson.encode(message))
return 1
"""

# Redis names a script by the SHA-1 of its text (EVALSHA)
_APPLY_SHA = hashlib.sha1(_APPLY.encode(), usedforsecurity=False).hexdigest()

# KEYS: lot, city.  ARGV: lot_id.  Removes a lot and its share of the totals.
_REMOVE = """
local old = redis.call('HGETALL', KEYS[1])
local old_o, old_c, old_d = 0, 0, nil
for i = 1, #old, 2 do
  local f = old[i]
  if string.sub(f, 1, 2) == 'o:' then old_o = old_o + tonumber(old[i + 1])
  elseif string.sub(f, 1, 2) == 'c:' then old_c = old_c + tonumber(old[i + 1])
  elseif f == 'd' then old_d = old[i + 1] end
end
if old_d then
  redis.call('HINCRBY', 'district:' .. old_d, 'o', 0 - old_o)
  redis.call('HINCRBY', 'district:' .. old_d, 'c', 0 - old_c)
  redis.call('HINCRBY', KEYS[2], 'o', 0 - old_o)
  redis.call('HINCRBY', KEYS[2], 'c', 0 - old_c)
end
redis.call('DEL', KEYS[1], 'lotmeta:' .. ARGV[1])
redis.call('ZREM', 'lots:geo', ARGV[1])
redis.call('PUBLISH', 'lot-changes', cjson.encode({lot_id = ARGV[1], deleted = true}))
return 1
"""


@dataclass(frozen=True, slots=True)
class LotState:
    """A lot's live counts as PostgreSQL committed them, with the version that orders writes."""

    lot_id: str
    version: int
    updated_at: str | None
    district: str
    occupied: Mapping[str, int]
    capacity: Mapping[str, int]


def apply_states(client: redis.Redis, states: Iterable[LotState]) -> list[bool]:
    """Write each lot's state (if newer than Redis holds) in one pipelined round trip.

    The script is called by its digest; only if Redis does not hold it (restarted, flushed) is
    it loaded and the pipeline sent again, which is safe: a write Redis already applied carries
    a version it no longer accepts.
    """
    calls: list[list[Any]] = []
    for s in states:
        types = sorted(s.capacity)
        argv: list[Any] = [s.lot_id, s.version, s.updated_at or "", s.district, len(types)]
        for t in types:
            argv += [t, int(s.occupied.get(t, 0)), int(s.capacity[t])]
        calls.append([lot_key(s.lot_id), CITY_KEY, DISTRICTS_KEY, *argv])
    if not calls:
        return []
    answers = _evalsha_all(client, calls, raise_on_error=False)
    missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
    if missing:
        client.script_load(_APPLY)
        for i, a in zip(missing, _evalsha_all(client, [calls[i] for i in missing]), strict=True):
            answers[i] = a
    for a in answers:
        if isinstance(a, Exception):
            raise a
    return [bool(a) for a in answers]


def _evalsha_all(
    client: redis.Redis, calls: list[list[Any]], *, raise_on_error: bool = True
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command("EVALSHA", _APPLY_SHA, 3, *call)
    return pipe.execute(raise_on_error=raise_on_error)


def put_meta(client: redis.Redis, lot_id: str, meta: Mapping[str, Any]) -> None:
    """Store the lot's registry summary and its position in the geo index."""
    location = meta["location"]
    pipe = client.pipeline(transaction=True)
    pipe.set(meta_key(lot_id), orjson.dumps(meta))
    pipe.geoadd(GEO_KEY, (location["lon"], location["lat"], lot_id))
    pipe.execute()


def remove_lot(client: redis.Redis, lot_id: str) -> None:
    client.register_script(_REMOVE)(keys=[lot_key(lot_id), CITY_KEY], args=[lot_id])


def read_state(client: redis.Redis, lot_id: str) -> dict[str, Any] | None:
    """The lot's live hash decoded, or None if Redis does not hold it."""
    raw: dict[str, str] = client.hgetall(lot_key(lot_id))  # type: ignore[assignment]
    return decode_state(raw) if raw else None


def decode_state(raw: Mapping[str, str]) -> dict[str, Any]:
    occupied: dict[str, int] = {}
    capacity: dict[str, int] = {}
    for field, value in raw.items():
        if field.startswith("o:"):
            occupied[field[2:]] = int(value)
        elif field.startswith("c:"):
            capacity[field[2:]] = int(value)
    return {
        "version": int(raw.get("v", 0)),
        "updated_at": raw.get("u") or None,
        "district": raw.get("d"),
        "occupied": occupied,
        "capacity": capacity,
    }


def flush(client: redis.Redis) -> None:
    """Delete every live-state key (before a rebuild)."""
    for pattern in ("lot:*", "lotmeta:*", "district:*"):
        batch: list[str] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    client.delete(GEO_KEY, CITY_KEY, DISTRICTS_KEY)
