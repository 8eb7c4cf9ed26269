"""The read path: answers from Redis, falls back to PostgreSQL, and refills Redis itself.

Redis (services.common.livestate) holds ``lot:{id}`` live counts, ``lotmeta:{id}`` registry
summaries, the ``lots:geo`` index and ``reserved:{id}`` counts. Two things make a Redis answer
trustworthy:

- a lot's detail needs its ``lot:{id}`` and ``lotmeta:{id}``; if either is missing the lot is
  read from PostgreSQL and written back (version-checked, so it cannot undo a newer write);
- a search needs the whole geo index, which only the marker ``lots:geo:complete`` vouches for:
  a full refill sets it after writing every lot, and a flush removes it with everything else.
  Without it, searches run in PostgreSQL (bounding box + haversine) and a refill starts.

A search or a lot detail reads from Redis only what Redis does not vouch for: the lots and the
geo index this process read on connections Redis tracks and that no invalidation has touched
since are taken from its own copies (``_Vouched``, ``geoindex.GeoIndex``), after one round trip
on those connections that takes in every invalidation sent before it (a detail's is a PING).

When Redis fails, this process serves from PostgreSQL for ``redis_retry_after_s`` before trying
again, and refills Redis once it answers again (it may have restarted empty or missed writes).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from itertools import chain
from sys import intern
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.availability import repository
from services.availability.domain import (
    GEO_MARGIN_M,
    LotData,
    Thresholds,
    bounding_box,
    free_spaces,
    haversine_m,
    lot_view,
    matches,
    parse_time,
    status_at,
    usage,
)
from services.availability.geoindex import GeoIndex, positions
from services.availability.settings import ReadPathSettings
from services.common import livestate, reserved
from services.common.app import dumps
from services.common.db import Database
from services.common.redis import AutoPipeline, connect

log = logging.getLogger("parking.availability")

GEO_COMPLETE_KEY = "lots:geo:complete"
REFILL_LOCK_KEY = "lots:geo:refilling"
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError)


def nearest(
    run: Callable[..., list[Any]],
    lon: float,
    lat: float,
    radius: float,
    count: int,
    first: float,
    keys: tuple[str, str] = (GEO_COMPLETE_KEY, livestate.GEO_KEY),
) -> list[Any] | None:
    """The ``count`` nearest members of the geo index within ``radius`` metres as GEOSEARCH's
    [member, distance] list (fewer: all of them), or None when the index is not vouched
    complete (``keys``: the completeness marker, the index); ``run`` sends commands (an
    AutoPipeline). GEOSEARCH reads every member in the
    cells around the whole radius however small ``count`` is, so where lots are dense it
    starts from ``first`` and doubles the radius until ``count`` members are within (those are
    then the nearest: any other is farther than that radius). Plain commands, not a script: in
    Redis 6.2 (the embedded one) a script's GEOSEARCH and reads cost Redis half as much again
    as the same commands sent."""
    r = min(radius, first)
    for _ in range(64):
        complete, hits = run(
            ("EXISTS", keys[0]),
            ("GEOSEARCH", keys[1], "FROMLONLAT", lon, lat, "BYRADIUS", r, "m",
             "ASC", "COUNT", count, "WITHDIST"),
        )  # fmt: skip
        if not complete:
            return None
        if len(hits) >= count or r >= radius:
            break
        r = min(radius, r * 2)
    return hits  # type: ignore[no-any-return]


def _hash(reply: Any) -> dict[str, str]:
    """A hash as HGETALL answers it: a map (RESP3) or a flat field/value list (RESP2)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


# A search source fetches the ``k`` nearest candidates (from ``min_d`` metres on, where it can),
# evaluates new ones into ``seen`` (id -> (exact distance, whether it matches the query, and
# either its view, when the lot cache holds it, or the lot, its reserved counts and its cache
# entry, to build it from)) and returns the frontier: how near (approximately, within
# GEO_MARGIN_M) the nearest candidate it has not evaluated may be, ``math.inf`` when it
# evaluated every candidate within the radius. With ``page`` > 0 it may leave unevaluated
# candidates beyond the ``page``-th nearest that cannot come before it (a search reads its page
# and not the whole fetch when every lot matches).
Seen = dict[
    str, tuple[float, bool, bytes | None, LotData | None, dict[str, int] | None, "Entry | None"]
]
Source = Callable[[int, float, Seen, int], float]


# a lot read from Redis: the lot, its reserved counts, and its entry in the lot cache
Found = tuple[LotData, dict[str, int], "Entry"]


class CacheIncomplete(Exception):
    """Redis lacks part of what an answer needs."""


@dataclass(frozen=True, slots=True)
class NearbyQuery:
    lat: float
    lon: float
    radius_m: float
    space_type: str | None
    min_free: int
    limit: int
    after: tuple[float, str] | None


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]  # each a lot view with its distance_m, as JSON (orjson.Fragment)
    next_after: tuple[float, str] | None


class _Reach:
    """How far a search has to reach for ``k`` lots, from the searches before it: the first
    radius the geo script tries (it doubles from there). A mean of the lots per square metre
    within the k-th nearest, so a city's dense centre and sparse edges share one guess; a guess
    too small costs a GEOSEARCH more, one too large reads more members, and neither changes
    the answer."""

    SLACK = 1.25  # the radius tried is this much beyond the guess

    def __init__(self) -> None:
        self.density = 0.0  # lots per square metre; 0: no search yet, try the whole radius

    def radius_for(self, k: int, radius: float) -> float:
        if self.density <= 0.0:
            return radius
        return min(radius, self.SLACK * math.sqrt(k / (math.pi * self.density)))

    def saw(self, k: int, kth_m: float) -> None:
        seen = k / (math.pi * max(kth_m, 1.0) ** 2)
        self.density = seen if self.density <= 0.0 else 0.8 * self.density + 0.2 * seen


Entry = tuple[Any, ...]  # one lot in _Lots


class _Lots:
    """Lots read from Redis, and their views, by lot id, reused while Redis holds the same
    text: parsing a lot's registry summary and live hash and building its view were most of a
    search's work per lot, and most reads find a lot as the last one left it (its summary
    changes when its operator edits the lot, its live hash on each event). A view is reused
    for the same reserved counts while its status holds (opening hours and the age of the data
    are judged again at every read).

    An entry is one plain tuple of strings, numbers, the view's JSON and flat tuples of
    strings and numbers, which the garbage collector stops tracking (it untracks exact tuples
    of untracked things, not named ones): a cache of objects it walks made each full collection
    of a busy worker take tens of milliseconds. Flat, because a collection untracks a tuple
    only once what it holds is untracked, and the young generations' two collections must be
    enough: with the dicts kept as tuples of item pairs inside the packed lot inside the entry,
    a lot new to the cache reached the oldest generation still tracked (about 16,000 entries
    after 20,000 reads of new lots, and full collections of 18-20 ms). An entry knows the text
    it was built from by a 128-bit BLAKE2 digest of it (a third of the entry's size if kept
    whole). Bounded to about ``size`` lots in two generations: lots read since the young one
    filled stay, and when it fills again the older one is dropped (least recently read), a few
    entries at each new one (freeing tens of thousands at once paused the worker for tens of
    milliseconds)."""

    # an entry: (digest of the text, reserved counts, view JSON, status, total, used, free per
    # type, *packed lot), the dicts among them flattened (see _flat) and the tariff as its JSON
    # (see _pack); the counts, view, status, usage and free spaces empty until the lot's view
    # is built
    def __init__(self, size: int, thresholds: Thresholds) -> None:
        self.half = max(1, size // 2)
        self.thresholds = thresholds
        self._young: dict[str, tuple[Any, ...]] = {}
        self._old: dict[str, tuple[Any, ...]] = {}
        self._dropped: dict[str, tuple[Any, ...]] = {}  # freed a few at a time

    def _get(self, lot_id: str) -> tuple[Any, ...] | None:
        entry = self._young.get(lot_id)
        if entry is None:
            entry = self._old.pop(lot_id, None)
            if entry is not None:
                self._put(lot_id, entry)
        return entry

    def _put(self, lot_id: str, entry: tuple[Any, ...]) -> None:
        if len(self._young) >= self.half and lot_id not in self._young:
            self._dropped.clear()  # (empty by now but for a tiny cache)
            self._dropped, self._old, self._young = self._old, self._young, {}
        self._young[lot_id] = entry
        for _ in range(min(2, len(self._dropped))):
            self._dropped.popitem()

    def holds(self, lot_id: str, digest: bytes) -> bool:
        """Whether the cache's entry for the lot was built from the text of ``digest``."""
        entry = self._young.get(lot_id) or self._old.get(lot_id)
        return entry is not None and entry[0] == digest

    def _entry(self, lot_id: str, digest: bytes) -> Entry | None:
        """The cache's entry for the lot, if it was built from the text of ``digest``."""
        entry = self._get(lot_id)
        return entry if entry is not None and entry[0] == digest else None

    def held_view(
        self, lot_id: str, digest: bytes, counts: tuple[Any, ...], now: datetime
    ) -> tuple[int, bytes] | None:
        """(version, view JSON) of the lot built from the text of ``digest``, when the view
        built last is for these (flat) reserved ``counts`` and its status still holds; else
        None (then ``held`` and ``view`` build it)."""
        entry = self._entry(lot_id, digest)
        if entry is None:
            return None
        view = self._still(entry, counts, now)
        return None if view is None else (entry[-2], view)

    def _still(self, entry: Entry, counts: tuple[Any, ...], now: datetime) -> bytes | None:
        """The view ``entry`` holds, if it was built for these (flat) reserved ``counts`` and
        its status still holds ``now`` (opening hours and the data's age judged again)."""
        _, held, view, status, total, used, _ = entry[:_PACKED]
        if not view or held != counts:
            return None
        hours, timezone, updated_at = entry[_PACKED + 6], entry[_PACKED + 7], entry[-1]
        if status_at(hours, timezone, updated_at, total, used, now, self.thresholds) != status:
            return None
        return view  # type: ignore[no-any-return]

    def evaluated(
        self,
        lot_id: str,
        digest: bytes,
        counts: tuple[Any, ...],
        now: datetime,
        space_type: str | None,
        min_free: int,
    ) -> tuple[float, float, bool, bytes] | None:
        """What a search needs of the lot built from the text of ``digest`` whose view built
        last holds for these (flat) reserved ``counts`` (as ``held_view``), without unpacking
        it (most of a search's CPU when every lot was unpacked): its position, whether it
        answers ``matches(lot, counts, space_type, min_free, now)``, and its view. None when
        that view does not hold (then ``held`` and ``view``)."""
        entry = self._entry(lot_id, digest)
        if entry is None:
            return None
        view = self._still(entry, counts, now)
        if view is None:
            return None
        # the status it holds is the lot's now: "closed" exactly when it is not open
        ok = min_free <= 0 or (
            _free(entry[_PACKED - 1], space_type) >= min_free and entry[3] != "closed"
        )
        return entry[_PACKED + 2], entry[_PACKED + 3], ok, view

    def held(self, lot_id: str, digest: bytes) -> tuple[LotData, Entry] | None:
        """The lot and the cache's entry for it, if that entry was built from the text of
        ``digest``."""
        entry = self._entry(lot_id, digest)
        return None if entry is None else (_unpack(entry[_PACKED:]), entry)

    def lot(self, lot_id: str, meta_json: str, state: Any) -> tuple[LotData, Entry]:
        """The lot of its ``lotmeta:`` JSON and its ``lot:`` hash (as HGETALL answers it), and
        the cache's entry for it, which ``view`` takes."""
        entry = self._get(lot_id)
        # the hash as Redis answered it: a flat list (RESP2) in the same order while the hash
        # is unchanged (a new order only costs a miss), or a map (RESP3)
        digest = blake2b(orjson.dumps((meta_json, state)), digest_size=16).digest()
        if entry is not None and entry[0] == digest:
            return _unpack(entry[_PACKED:]), entry
        lot = lot_from_redis(lot_id, orjson.loads(meta_json), _hash(state))
        entry = (digest, (), b"", "", 0, 0, (), *_pack(lot))
        self._put(lot_id, entry)
        return lot, entry

    def view(
        self, lot: LotData, counts: Mapping[str, int], now: datetime, entry: Entry | None
    ) -> bytes:
        """The JSON of ``lot_view(lot, counts, now, thresholds)``: the one built last for this
        lot and these counts while its status is the same. ``entry`` is the one ``lot`` gave
        with ``lot`` (None for a lot not read through here): while it is still the lot's
        entry, ``lot`` is the lot it holds."""
        if entry is None or self._young.get(lot.id) is not entry:  # not read here, or changed
            return dumps(lot_view(lot, counts, now, self.thresholds))
        now_held = _flat(counts)
        view = self._still(entry, now_held, now)
        if view is not None:
            return view
        built = lot_view(lot, counts, now, self.thresholds)
        view = _kept(dumps(built))
        total, used = usage(lot, counts)
        free = _flat({t: free_spaces(lot, counts, t) for t in lot.capacity})
        digest, packed = entry[0], entry[_PACKED:]
        self._young[lot.id] = (digest, now_held, view, built["status"], total, used, free, *packed)
        return view


def _kept(data: bytes) -> bytes:
    """A copy of orjson's output the size of its content, to keep: the output itself holds
    the whole buffer orjson wrote it in (4 to 8 KB for a lot's view)."""
    return memoryview(data).tobytes()


_PACKED = 7  # an entry's fields before its packed lot's


def _free(flat: tuple[Any, ...], space_type: str | None) -> int:
    """Free spaces of ``space_type`` (of every type if None) from an entry's flat free counts,
    as ``free_spaces`` counts them."""
    if space_type is None:
        return sum(flat[1::2])
    for t, n in zip(flat[::2], flat[1::2], strict=True):
        if t == space_type:
            return n  # type: ignore[no-any-return]
    return 0


def _flat(mapping: Mapping[str, Any]) -> tuple[Any, ...]:
    """A flat dict's items as one flat tuple: key, value, key, value..."""
    return tuple(chain.from_iterable(mapping.items()))


def _dict(flat: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _pack(lot: LotData) -> tuple[Any, ...]:
    """``lot`` as a plain tuple without dicts (its counts flattened, its tariff as JSON)."""
    return (
        *lot[:8],
        None if lot.tariff is None else _kept(orjson.dumps(lot.tariff)),
        _flat(lot.capacity),
        _flat(lot.occupied),
        lot.version,
        lot.updated_at,
    )


def _unpack(packed: tuple[Any, ...]) -> LotData:
    tariff, capacity, occupied, version, updated_at = packed[8:]
    return LotData._make(
        (
            *packed[:8],
            None if tariff is None else orjson.loads(tariff),
            _dict(capacity),
            _dict(occupied),
            version,
            updated_at,
        )
    )


_PENDING: tuple[Any, ...] = ("pending",)  # a read of the lot is in flight


class _Vouched:
    """Lots whose ``lotmeta:``, ``lot:`` and ``reserved:`` keys this process read on
    connections Redis tracks for it (``CLIENT TRACKING ON``, RESP3): Redis then pushes an
    invalidation on that connection when any of them changes, expires or is flushed, in order
    with the connection's replies. A search takes a vouched lot from the lot cache instead of
    reading it (most of a search's work in Redis and in this process was reading lots that had
    not changed), and so does lot detail, after a PING.

    A lot is marked pending before its read is sent, and vouched for when the read is in only
    if no invalidation of it came meanwhile (one in the same batch of replies would otherwise
    be undone). It holds the digest of the cache entry it vouches for (a lot detail may put
    another there) and the reserved counts with the instant Redis lets them expire. Anything
    that can lose a push (a connection broken or made anew) forgets every lot.

    It vouches the same way for a copy of the geo index (:class:`GeoIndex`), read whole:
    ``geo`` is the copy while no change of ``lots:geo`` has come since its read was sent."""

    def __init__(self) -> None:
        self._lots: dict[str, tuple[Any, ...]] = {}
        self.geo: GeoIndex | None = None
        self._geo_read: object | None = None  # the token of the geo index's read in flight

    def geo_reading(self) -> object:
        """Before reading the geo index: its token, which ``geo_vouch`` wants back."""
        self.geo = None
        token = self._geo_read = object()
        return token

    def geo_unchanged(self, token: object) -> bool:
        return self._geo_read is token

    def geo_vouch(self, token: object, index: GeoIndex) -> None:
        if self._geo_read is token:
            self.geo = index

    def __contains__(self, lot_id: str) -> bool:
        """Whether ``lot_id`` names a lot read on the tracked pipeline and not touched since."""
        return lot_id in self._lots

    def get(self, lot_id: str, now_ms: float) -> tuple[Any, ...] | None:
        """(until, digest, *flat reserved counts) of a lot vouched for, or None."""
        held = self._lots.get(lot_id)
        if held is None or held is _PENDING or held[0] <= now_ms:
            return None
        return held

    def reading(self, lot_ids: Sequence[str]) -> None:
        for lot_id in lot_ids:
            self._lots[lot_id] = _PENDING

    def vouch(self, lot_id: str, until_ms: float, digest: bytes, counts: Mapping[str, int]) -> None:
        if self._lots.get(lot_id) is _PENDING:
            self._lots[lot_id] = (until_ms, digest, *_flat(counts))

    def invalidated(self, push: Sequence[Any]) -> None:
        """Redis' ``invalidate`` push: the keys changed (None: every key, a flush)."""
        keys = push[1] if len(push) > 1 else None
        if keys is None:
            self.forget_all()
            return
        for key in keys:
            if isinstance(key, bytes):
                key = key.decode()
            if key == livestate.GEO_KEY:
                self.geo = self._geo_read = None
            else:
                self._lots.pop(key.partition(":")[2], None)

    def forget_all(self) -> None:
        self._lots.clear()
        self.geo = self._geo_read = None


# reserved counts are kept this long less than Redis keeps them (clocks of two hosts)
_UNTIL_MARGIN_MS = 1000.0


def _off_loop(work: Callable[[], Any]) -> Any:
    """``work()`` in a native thread when gevent runs this process (its event loop, serving
    requests, then waits at most the interpreter's switch interval at a time), else here."""
    from gevent import get_hub, monkey

    if monkey.is_module_patched("threading"):
        return get_hub().threadpool.apply(work)
    return work()


def lot_from_redis(lot_id: str, meta: Mapping[str, Any], state: Mapping[str, str]) -> LotData:
    """A lot from its parsed ``lotmeta:`` JSON and its ``lot:`` hash. The strings many lots
    share (space types, district, hours, time zone) are interned: one copy for the cache."""
    occupied: dict[str, int] = {}
    capacity: dict[str, int] = {}
    version, updated_at = 0, None
    for field, value in state.items():
        if field[:2] == "o:":
            occupied[intern(field[2:])] = int(value)
        elif field[:2] == "c:":
            capacity[intern(field[2:])] = int(value)
        elif field == "v":
            version = int(value)
        elif field == "u":
            updated_at = parse_time(value)
    location = meta["location"]
    return LotData(
        id=lot_id,
        name=meta["name"],
        lat=location["lat"],
        lon=location["lon"],
        district=intern(meta["district"]),
        address=meta.get("address"),
        opening_hours=intern(meta.get("opening_hours") or "24/7"),
        timezone=intern(meta.get("timezone") or "Asia/Shanghai"),
        tariff=meta.get("tariff"),
        capacity=capacity,
        occupied=occupied,
        version=version,
        updated_at=updated_at,
    )


def meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The registry summary the ingestion service keeps in ``lotmeta:{id}`` (same fields)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "location": {"lat": row["lat"], "lon": row["lon"]},
        "district": row["district"],
        "address": row["address"],
        "opening_hours": row["opening_hours"],
        "timezone": row["timezone"],
        "capacity": row["registry_capacity"],
        "reservable": row["reservable"],
        "tariff": row["tariff"],
    }


def write_lots(client: redis.Redis, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write registry summaries, geo positions and live states of ``rows`` to Redis."""
    if not rows:
        return
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.set(livestate.meta_key(row["id"]), orjson.dumps(meta_of(row)))
        pipe.geoadd(livestate.GEO_KEY, (row["lon"], row["lat"], row["id"]))
    pipe.execute()
    states = []
    for row in rows:
        lot = repository.lot_data(row)
        states.append(
            livestate.LotState(
                lot_id=lot.id,
                version=lot.version,
                updated_at=lot.updated_at.isoformat() if lot.updated_at else None,
                district=lot.district,
                occupied={t: int(lot.occupied.get(t, 0)) for t in lot.capacity},
                capacity={t: int(n) for t, n in lot.capacity.items()},
            )
        )
    livestate.apply_states(client, states)


class ReadPath:
    """One per app and process: the Redis client, the PostgreSQL pool and the refill state."""

    def __init__(
        self,
        db: Database,
        redis_url: str,
        redis_timeout_s: float,
        thresholds: Thresholds,
        tuning: ReadPathSettings,
    ) -> None:
        self.db = db
        self.redis_url = redis_url
        self.redis_timeout_s = redis_timeout_s
        self.thresholds = thresholds
        self.tuning = tuning
        self._client: redis.Redis | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._was_down = False
        self._refilling = False
        self._next_refill = 0.0
        self._pipelines: dict[int, AutoPipeline] = {}
        self._vouched = _Vouched()
        self._geo_building = False
        self._next_geo_build = 0.0
        self._reach = _Reach()
        self._lots = _Lots(tuning.lot_cache_max, thresholds)

    # -- Redis with a breaker --------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """This process's client: short timeouts and a single quick retry (fail over fast)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    client = connect(self.redis_url, self.redis_timeout_s)
                    client.set_retry(Retry(NoBackoff(), 1))
                    self._client = client
                    self._pid = os.getpid()
        return self._client

    def knows(self, text: str) -> bool:
        """Whether ``text`` is the id of a lot this process vouches for (or is reading), so an
        id in the canonical form ids are kept in, as clients polling a lot send it: taken as it
        is, without parsing it as a UUID."""
        return text in self._vouched

    def usable_redis(self) -> redis.Redis | None:
        """The client, or None while the breaker holds Redis for down."""
        if self._down_until and time.monotonic() < self._down_until:
            return None
        return self.client

    def redis_failed(self, exc: BaseException) -> None:
        self._vouched.forget_all()
        self._down_until = time.monotonic() + self.tuning.redis_retry_after_s
        with self._lock:
            if self._was_down:
                return
            self._was_down = True
        log.warning("redis unavailable, serving from postgresql: %s", type(exc).__name__)
        threading.Thread(target=self._probe, name="redis-probe", daemon=True).start()

    def _probe(self) -> None:
        """Ping Redis until it answers, then refill it (even if no request comes meanwhile)."""
        while self._was_down:
            time.sleep(max(0.1, self.tuning.redis_retry_after_s))
            try:
                self.client.ping()
            except REDIS_ERRORS:
                continue
            self.redis_answered()

    def redis_answered(self) -> None:
        if not self._was_down:
            return
        with self._lock:
            if not self._was_down:
                return
            self._was_down = False
            self._down_until = 0.0
        log.info("redis answers again, refilling it")
        self.schedule_refill(force=True)

    def run(self, work: Callable[[redis.Redis], Any]) -> Any:
        """``work(client)``, or None if Redis is down or fails (then the breaker opens)."""
        client = self.usable_redis()
        if client is None:
            return None
        try:
            result = work(client)
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)
            return None
        self.redis_answered()
        return result

    # -- lot detail ------------------------------------------------------------------------------

    def detail(self, lot_id: str, now: datetime) -> tuple[int, dict[str, Any]] | None:
        """The lot's live version and view, or None if it is not a live lot."""
        client = self.usable_redis()
        if client is not None:
            try:
                view = self._detail_redis(client, lot_id, now)
            except REDIS_ERRORS as exc:
                self.redis_failed(exc)
            else:
                self.redis_answered()
                if view is not None:
                    return view
        return self._detail_pg(lot_id, now)

    def _read(
        self, client: redis.Redis, lot_ids: Sequence[str], now: datetime
    ) -> list[Found | None]:
        """Each lot from Redis with its reserved counts (filled from PostgreSQL where not
        cached), or None where Redis lacks the lot; each lot read whole is vouched for from
        then on (see :class:`_Vouched`)."""
        commands: list[tuple[str, ...]] = [("MGET", *map(livestate.meta_key, lot_ids))]
        for lot_id in lot_ids:
            commands += [
                ("HGETALL", livestate.lot_key(lot_id)),
                ("HGETALL", reserved.reserved_key(lot_id)),
            ]
        self._vouched.reading(lot_ids)
        replies = self._pipeline(client)(*commands)
        return self._decode(
            client,
            lot_ids,
            replies[0],
            replies[1::2],
            replies[2::2],
            now,
            vouch=self._vouched.vouch,
        )

    def _read_vouched(
        self, client: redis.Redis, lot_ids: Sequence[str], now: datetime
    ) -> list[Found | None]:
        """``_read`` for the lots Redis does not vouch for; the others from the lot cache."""
        out: list[Found | None] = []
        unread: list[str] = []
        now_ms = time.time() * 1000.0
        for lot_id in lot_ids:
            vouched = self._vouched.get(lot_id, now_ms)
            held = None if vouched is None else self._lots.held(lot_id, vouched[1])
            if vouched is None or held is None:
                unread.append(lot_id)
                out.append(None)
            else:
                out.append((held[0], _dict(vouched[2:]), held[1]))
        if unread:
            read = iter(self._read(client, unread, now))
            out = [next(read) if found is None else found for found in out]
        return out

    def _decode(
        self,
        client: redis.Redis,
        lot_ids: Sequence[str],
        metas: Sequence[str | None],
        states: Sequence[Any],
        helds: Sequence[Any],
        now: datetime,
        vouch: Callable[[str, float, bytes, Mapping[str, int]], None] | None = None,
    ) -> list[Found | None]:
        """The lots of their ``lotmeta:`` JSON, ``lot:`` and ``reserved:`` hashes as Redis
        answered them, with the reserved counts not cached filled from PostgreSQL; each lot
        read whole from Redis, with reserved counts that say when they expire, is passed to
        ``vouch`` (lot id, expiry in ms since the epoch, cache entry's digest, counts)."""
        out: list[Found | None] = []
        leased: list[str] = []
        for lot_id, meta, state_reply, held in zip(lot_ids, metas, states, helds, strict=True):
            if not state_reply or not meta:
                out.append(None)
                continue
            raw = _hash(held)
            counts = reserved.decode(raw)
            if counts is None:
                leased.append(lot_id)
                counts = {}
            lot, entry = self._lots.lot(lot_id, meta, state_reply)
            out.append((lot, counts, entry))
            if vouch is not None and lot_id not in leased:
                until = reserved.until_ms(raw)
                if until is not None:
                    vouch(lot_id, until - _UNTIL_MARGIN_MS, entry[0], counts)
        if leased:  # not cached: fill from PostgreSQL, read after taking the fill lease
            token = reserved.lease(client, leased)
            with self.db.connection() as conn:
                snapshot = reserved.reserved_snapshot(conn, leased, now)
            reserved.store(client, token, snapshot, now, self.tuning.reserved_cache_max_s)
            for n, found in enumerate(out):
                if found is not None and found[0].id in snapshot:
                    out[n] = (found[0], snapshot[found[0].id].counts, found[2])
        return out

    def _pipeline(self, client: redis.Redis) -> AutoPipeline:
        """The auto-pipeline of plain commands beside ``client`` (this process's client), on
        RESP3 connections of its own that Redis tracks (see :class:`_Vouched`); each one made
        forgets every vouched lot. (Over RESP2 hiredis built a hash's reply three times
        faster, 0.74 against 2.5 us, which mattered while a search read every lot.)"""
        pipeline = self._pipelines.get(id(client))
        if pipeline is None:
            # no health-check PING: redis-py reads its answer recursing once per push before
            # it, and a connection idle through a refill holds thousands (a failed command
            # drops the connection instead)
            tracked = connect(
                self.redis_url,
                self.redis_timeout_s,
                protocol=3,
                on_connect=self._track,
                health_check_s=0,
            )
            pipeline = self._pipelines[id(client)] = AutoPipeline(
                tracked, on_broken=self._vouched.forget_all, gather=True
            )
        return pipeline

    def _track(self, conn: Any) -> None:
        """Set up a new tracked connection: redis-py's handshake, then CLIENT TRACKING, its
        invalidations to ``_Vouched``."""
        self._vouched.forget_all()
        conn.on_connect()
        conn._parser.set_invalidation_push_handler(self._vouched.invalidated)
        conn.send_command("CLIENT", "TRACKING", "ON")
        if str(conn.read_response()) != "OK":
            raise redis.ConnectionError("Redis refused CLIENT TRACKING")

    def _detail_redis(self, client: redis.Redis, lot_id: str, now: datetime) -> Any:
        view = self._detail_vouched(client, lot_id, now)
        if view is not None:
            return view
        found = self._read(client, [lot_id], now)[0]
        if found is None:
            return None
        lot, counts, entry = found
        return lot.version, orjson.Fragment(self._lots.view(lot, counts, now, entry))

    def _detail_vouched(
        self, client: redis.Redis, lot_id: str, now: datetime
    ) -> tuple[int, orjson.Fragment] | None:
        """The lot's version and view from the lot cache while Redis vouches for it, else
        None. A PING on the tracked connection first takes in every invalidation Redis sent
        before it, so a change Redis took before this request (an event's live state,
        acknowledged) is seen: a lot vouched for after it is as Redis holds it (as a search
        checks its lots after its round trip for the geo index's marker). The PING costs Redis
        and this process less than reading the lot's three keys and checking them against the
        cache, and the view built last is taken as it is while its status holds."""
        vouched = self._vouched.get(lot_id, time.time() * 1000.0)
        if vouched is None or not self._lots.holds(lot_id, vouched[1]):
            return None
        self._pipeline(client)(("PING",))
        if self._vouched.get(lot_id, time.time() * 1000.0) is not vouched:
            return None  # changed meanwhile (or read again): read it
        built = self._lots.held_view(lot_id, vouched[1], vouched[2:], now)
        if built is not None:
            return built[0], orjson.Fragment(built[1])
        held = self._lots.held(lot_id, vouched[1])
        if held is None:
            return None
        lot, entry = held
        return lot.version, orjson.Fragment(self._lots.view(lot, _dict(vouched[2:]), now, entry))

    def _detail_pg(self, lot_id: str, now: datetime) -> tuple[int, dict[str, Any]] | None:
        with self.db.connection() as conn:
            rows = repository.live_lots(conn, lot_ids=[lot_id])
            if not rows:
                return None
            held = reserved.reserved_now(conn, [lot_id], now)[lot_id]
        self.run(lambda client: self._fill(client, rows))
        lot = repository.lot_data(rows[0])
        return lot.version, lot_view(lot, held, now, self.thresholds)

    def _fill(self, client: redis.Redis, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` back to Redis, then undo it for any lot deleted meanwhile."""
        write_lots(client, rows)
        with self.db.connection() as conn:
            gone = repository.deleted_among(conn, lot_ids=[r["id"] for r in rows])
        for lot_id in gone:
            livestate.remove_lot(client, lot_id)

    # -- nearby search ---------------------------------------------------------------------------

    def nearby(self, query: NearbyQuery, now: datetime) -> Page:
        client = self.usable_redis()
        if client is not None:
            try:
                page = self._search(query, now, self._redis_source(client, query, now))
            except CacheIncomplete:
                self.redis_answered()
                self.schedule_refill()
            except REDIS_ERRORS as exc:
                self.redis_failed(exc)
            else:
                self.redis_answered()
                return page
        with self.db.connection() as conn:
            return self._search(query, now, self._pg_source(conn, query, now))

    def _search(self, query: NearbyQuery, now: datetime, source: Source) -> Page:
        after = query.after
        min_d = max(0.0, after[0] - GEO_MARGIN_M) if after else 0.0
        k = query.limit + 1 + max(4, query.limit // 4)
        seen: Seen = {}
        found: list[tuple[float, str]] = []
        page = query.limit + 1  # the first fetch evaluates about a page's worth
        for _ in range(16):
            frontier = source(k, min_d, seen, page)
            page = 0  # a filter left the page short: later fetches evaluate all they fetch
            found = sorted(
                (d, i)
                for i, (d, ok, *_) in seen.items()
                if ok and d <= query.radius_m and (after is None or (d, i) > after)
            )
            if frontier == math.inf:
                break  # every candidate within the radius is evaluated
            if len(found) > query.limit and frontier > found[query.limit][0] + GEO_MARGIN_M:
                break  # nothing unevaluated can come before the page's end
            k *= 4
        items = []
        for d, i in found[: query.limit]:
            _, _, view, lot, held, entry = seen[i]
            if view is None:
                assert lot is not None and held is not None
                view = self._lots.view(lot, held, now, entry)
            # and its distance, as the last field
            distance = b',"distance_m":' + orjson.dumps(round(d, 1)) + b"}"
            items.append(orjson.Fragment(view[:-1] + distance))
        next_after = found[query.limit - 1] if len(found) > query.limit else None
        return Page(items, next_after)

    def _redis_source(self, client: redis.Redis, query: NearbyQuery, now: datetime) -> Source:
        run = self._pipeline(client)

        def source(k: int, min_d: float, seen: Seen, page: int) -> float:
            radius = query.radius_m + GEO_MARGIN_M
            first = self._reach.radius_for(k, radius)
            hits = self._nearest(client, run, query.lon, query.lat, radius, k, first)
            if hits is None:
                raise CacheIncomplete("the geo index is not vouched complete")
            if not hits:
                return math.inf
            full = len(hits) >= k
            if full:
                self._reach.saw(k, float(hits[-1][1]))
            near = [(m, float(d)) for m, d in hits if float(d) >= min_d]
            frontier = float(hits[-1][1]) if full else math.inf
            if 0 < page < len(near):
                # a lot past the page's last by more than twice the margin cannot come before
                # it: its exact distance exceeds every one of the first ``page``'s
                cutoff = near[page - 1][1] + 2 * GEO_MARGIN_M
                later = [d for _, d in near if d > cutoff]
                if later:
                    frontier = later[0]
                    near = near[: len(near) - len(later)]
            unheld = []
            now_ms = time.time() * 1000.0
            for lot_id in (m for m, _ in near if m not in seen):
                vouched = self._vouched.get(lot_id, now_ms)
                held = None if vouched is None else self._lots.evaluated(
                    lot_id, vouched[1], vouched[2:], now, query.space_type, query.min_free
                )  # fmt: skip
                if held is None:
                    unheld.append(lot_id)
                    continue
                lat, lon, ok, view = held
                d = haversine_m(query.lat, query.lon, lat, lon)
                seen[lot_id] = (d, ok, view, None, None, None)
            for lot_id, found in zip(unheld, self._read_vouched(client, unheld, now), strict=True):
                if found is None:
                    raise CacheIncomplete(f"lot {lot_id} is in the geo index only")
                lot, counts, entry = found
                d = haversine_m(query.lat, query.lon, lot.lat, lot.lon)
                ok = matches(lot, counts, query.space_type, query.min_free, now)
                seen[lot_id] = (d, ok, None, lot, counts, entry)
            return frontier

        return source

    def _nearest(
        self,
        client: redis.Redis,
        run: AutoPipeline,
        lon: float,
        lat: float,
        radius: float,
        count: int,
        first: float,
    ) -> list[Any] | None:
        """``nearest``, from this process's copy of the geo index while Redis vouches for it
        (and the index is complete); else from Redis, and a copy is made in the background.
        The round trip for the completeness marker also takes in every invalidation Redis sent
        before it, so the copy (and the lots vouched for after it) are checked after it."""
        if self._vouched.geo is not None:
            (complete,) = run(("EXISTS", GEO_COMPLETE_KEY))
            if not complete:
                return None
            index = self._vouched.geo
            hits = None if index is None else index.nearest(lon, lat, radius, count, first)
            if hits is not None:
                return hits
        else:
            self._want_geo(client)
        return nearest(run, lon, lat, radius, count, first)

    def _want_geo(self, client: redis.Redis) -> None:
        """Start copying the geo index, unless a copy is being made or one was made lately
        (the next waits four times as long as the last one took, at least a second: lots
        registered one after another each change the index)."""
        with self._lock:
            if (
                self._geo_building
                or time.monotonic() < self._next_geo_build
                or not self.tuning.geo_copy_max
            ):
                return
            self._geo_building = True
        threading.Thread(
            target=self._copy_geo, args=(client,), name="geo-copy", daemon=True
        ).start()

    def _copy_geo(self, client: redis.Redis) -> None:
        started = time.monotonic()
        wait = 0.0
        try:
            run = self._pipeline(client)
            run(("EXISTS", GEO_COMPLETE_KEY))  # connected first (a new connection forgets all)
            token = self._vouched.geo_reading()
            pairs: list[Any] = []
            chunk = self.tuning.refill_chunk
            largest = self.tuning.geo_copy_max
            for start in range(0, largest + 1, chunk):
                (got,) = run(("ZRANGE", livestate.GEO_KEY, start, start + chunk - 1, "WITHSCORES"))
                pairs += got
                if len(got) < chunk or not self._vouched.geo_unchanged(token):
                    break
            if len(pairs) > largest:  # too large to copy: GEOSEARCH answers, tried again later
                log.info("geo index not copied: more than %d lots", largest)
                wait = 300.0
            elif self._vouched.geo_unchanged(token):
                index = _off_loop(lambda: GeoIndex.build(positions(pairs)))
                self._vouched.geo_vouch(token, index)
                log.info(
                    "geo index copied: %d lots in %.3f s%s",
                    index.size,
                    time.monotonic() - started,
                    "" if self._vouched.geo is index else " (changed meanwhile: dropped)",
                )
        except REDIS_ERRORS as exc:
            log.info("copying the geo index failed: %s", type(exc).__name__)
        finally:
            with self._lock:
                self._geo_building = False
                took = time.monotonic() - started
                self._next_geo_build = time.monotonic() + max(1.0, 4 * took, wait)

    def _pg_source(self, conn: Any, query: NearbyQuery, now: datetime) -> Source:
        box = bounding_box(query.lat, query.lon, query.radius_m + GEO_MARGIN_M)

        def source(k: int, min_d: float, seen: Seen, page: int) -> float:
            rows = repository.nearby_lots(
                conn,
                lat=query.lat,
                lon=query.lon,
                radius_m=query.radius_m + GEO_MARGIN_M,
                box=box,
                min_distance_m=min_d,
                limit=k,
            )
            new = [r for r in rows if r["id"] not in seen]
            held = reserved.reserved_now(conn, [r["id"] for r in new], now)
            distances = []
            for row in rows:
                lot = repository.lot_data(row)
                d = haversine_m(query.lat, query.lon, lot.lat, lot.lon)
                distances.append(d)
                if lot.id not in seen:
                    ok = matches(lot, held[lot.id], query.space_type, query.min_free, now)
                    seen[lot.id] = (d, ok, None, lot, held[lot.id], None)
            return distances[-1] if len(rows) >= k else math.inf

        return source

    # -- refill ----------------------------------------------------------------------------------

    def schedule_refill(self, *, force: bool = False) -> None:
        """Refill Redis from PostgreSQL in the background: one at a time, and (unless
        ``force``) at most one every 5 s, the next one waiting for its turn."""
        with self._lock:
            if self._refilling:
                return
            self._refilling = True
            delay = 0.0 if force else max(0.0, self._next_refill - time.monotonic())
        threading.Thread(
            target=self._refill_guarded, args=(delay,), name="refill", daemon=True
        ).start()

    def _refill_guarded(self, delay: float) -> None:
        try:
            time.sleep(delay)
            client = self.client
            token = f"{os.getpid()}-{time.monotonic()}"
            if client.set(REFILL_LOCK_KEY, token, nx=True, ex=300):
                try:
                    count = self.refill(client)
                    log.info("redis refilled with %d lots", count)
                finally:
                    if client.get(REFILL_LOCK_KEY) == token:
                        client.delete(REFILL_LOCK_KEY)
        except Exception as exc:
            log.warning("redis refill failed: %s", type(exc).__name__)
        finally:
            with self._lock:
                self._refilling = False
                self._next_refill = time.monotonic() + 5.0

    def refill(self, client: redis.Redis) -> int:
        """Write every live lot to Redis in batches, then vouch for the geo index."""
        with self.db.connection() as conn:
            return refill(
                conn,
                client,
                chunk=self.tuning.refill_chunk,
                reserved_max_age_s=self.tuning.reserved_cache_max_s,
            )


def refill(
    conn: Any, client: redis.Redis, *, chunk: int = 5000, reserved_max_age_s: float = 600.0
) -> int:
    """Write every live lot (and its reserved counts) to Redis in batches, undo lots deleted
    meanwhile, then set the geo index's completeness marker; return the number of lots."""
    started = datetime.now(UTC)
    count = 0
    after: str | None = None
    for _ in range(100_000):
        rows = repository.live_lots_page(conn, after=after, limit=chunk)
        if not rows:
            break
        write_lots(client, rows)
        ids = [r["id"] for r in rows]
        token = reserved.lease(client, ids)
        now = datetime.now(UTC)
        snapshot = reserved.reserved_snapshot(conn, ids, now)
        reserved.store(client, token, snapshot, now, reserved_max_age_s)
        count += len(rows)
        after = rows[-1]["id"]
        time.sleep(0)  # let other greenlets run between batches
    for lot_id in repository.deleted_since(conn, since=started - timedelta(seconds=1)):
        livestate.remove_lot(client, lot_id)
    client.set(GEO_COMPLETE_KEY, started.isoformat())
    return count
