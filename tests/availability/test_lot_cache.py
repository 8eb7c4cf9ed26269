"""The read path's lot cache answers what parsing and building afresh would, whatever the
sequence of reads: summaries edited, counts moving, reservations changing, time passing."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from orjson import loads

from services.availability.domain import Thresholds, lot_view, matches
from services.availability.readpath import _flat, _Lots, _Vouched, lot_from_redis
from services.common.app import dumps

THRESHOLDS = Thresholds(unknown_after_s=600.0, almost_full_ratio=0.9)
START = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)
IDS = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
# (space type, minimum free) of nearby searches
SEARCHES = [(t, n) for t in (None, "standard", "ev", "accessible") for n in (0, 1, 2, 5, 9)]


def meta_json(name: str, hours: str) -> str:
    return orjson.dumps(
        {
            "id": "x",
            "name": name,
            "location": {"lat": 30.2, "lon": 120.1},
            "district": "xihu",
            "address": None,
            "opening_hours": hours,
            "timezone": "Asia/Shanghai",
            "tariff": {"currency": "CNY", "per_hour": "5.00"},
        }
    ).decode()


def state(version: int, occupied: int, updated: datetime) -> dict[str, str]:
    return {"v": str(version), "u": updated.isoformat(), "o:standard": str(occupied),
            "c:standard": "10", "o:ev": "1", "c:ev": "2"}  # fmt: skip


def resp2(live: dict[str, str]) -> list[str]:
    """A hash as HGETALL answers it in RESP2 (and in a Lua script's reply): field, value..."""
    return [x for item in live.items() for x in item]


read = st.tuples(
    st.sampled_from(IDS),
    st.sampled_from(["north", "south"]),  # the operator renames the lot
    st.sampled_from(["24/7", "Mo-Fr 08:00-20:00"]),
    st.integers(0, 3),  # the version
    st.integers(0, 10),  # occupied standard spaces
    st.integers(0, 900),  # seconds from the start to the lot's last update
    st.dictionaries(st.sampled_from(["standard", "ev"]), st.integers(0, 3), max_size=2),
    st.integers(0, 1800),  # seconds from the start to the read
    st.booleans(),  # the hash as a RESP2 list (else a map, as RESP3 answers it)
    st.booleans(),  # the view asked with an entry no longer the lot's
)


@settings(max_examples=200, deadline=None)
@given(st.lists(read, min_size=1, max_size=40), st.sampled_from([1, 2, 3, 1000]))
def test_cached_lots_and_views_are_what_building_afresh_gives(reads: list[Any], size: int) -> None:
    lots = _Lots(size, THRESHOLDS)
    entries: dict[str, Any] = {}
    for lot_id, name, hours, version, occupied, updated_s, counts, now_s, flat, old in reads:
        meta = meta_json(name, hours)
        live = state(version, occupied, START + timedelta(seconds=updated_s))
        now = START + timedelta(seconds=now_s)
        lot, entry = lots.lot(lot_id, meta, resp2(live) if flat else dict(live))
        fresh = lot_from_redis(lot_id, orjson.loads(meta), live)
        assert lot == fresh
        given_entry = entries.get(lot_id, entry) if old else entry
        expected = dumps(lot_view(fresh, counts, now, THRESHOLDS))
        # the view built last, taken as it is (a lot detail Redis vouches for)
        held = lots.held_view(lot_id, entry[0], _flat(dict(counts)), now)
        assert held is None or held == (fresh.version, expected)
        assert lots.view(lot, dict(counts), now, given_entry) == expected
        assert lots.view(lot, dict(counts), now, None) == expected  # a lot not read here
        # what a search takes of a lot whose view holds: as matches and a fresh view answer
        for space_type, min_free in SEARCHES:
            got = lots.evaluated(lot_id, entry[0], _flat(dict(counts)), now, space_type, min_free)
            if got is not None:
                ok = matches(fresh, counts, space_type, min_free, now)
                assert got == (fresh.lat, fresh.lon, ok, expected), (space_type, min_free)
        entries[lot_id] = entry


def test_the_same_text_gives_the_same_objects_and_a_change_new_ones() -> None:
    lots = _Lots(1000, THRESHOLDS)
    meta, live = meta_json("north", "24/7"), state(1, 4, START)
    lot, _ = lots.lot(IDS[0], meta, live)
    again, entry = lots.lot(IDS[0], str(meta), resp2(live))  # equal text, other objects
    assert again == lot
    view = lots.view(lot, {}, START, entry)
    _, entry = lots.lot(IDS[0], meta, resp2(live))
    assert lots.view(lot, {}, START + timedelta(seconds=1), entry) is view
    assert lots.held_view(IDS[0], entry[0], (), START + timedelta(seconds=2)) == (1, view)
    assert lots.held_view(IDS[0], entry[0], ("standard", 1), START) is None  # other counts
    assert lots.held_view(IDS[0], entry[0], (), START + timedelta(seconds=601)) is None  # unknown
    assert lots.held_view(IDS[1], entry[0], (), START) is None
    assert loads(view)["status"] == "open" and loads(view)["free"]["standard"] == 6
    _, entry = lots.lot(IDS[0], meta, resp2(live))
    held = loads(lots.view(lot, {"standard": 6}, START, entry))
    assert held["free"]["standard"] == 0 and held["reserved"]["standard"] == 6
    _, entry = lots.lot(IDS[0], meta, resp2(live))
    stale = loads(lots.view(lot, {"standard": 6}, START + timedelta(seconds=601), entry))
    assert stale["status"] == "unknown"
    moved, entry = lots.lot(IDS[0], meta, state(2, 5, START))
    assert moved.occupied["standard"] == 5
    assert loads(lots.view(moved, {}, START, entry))["free"]["standard"] == 5


def test_a_search_takes_a_held_view_without_unpacking_the_lot() -> None:
    """Free spaces per type and opening hours judged from the entry, as ``matches`` judges
    the lot; None once the view no longer holds (other counts, the data too old)."""
    lots = _Lots(1000, THRESHOLDS)
    meta, live = meta_json("north", "08:00-20:00"), state(1, 4, START)  # 15:00 there: open
    lot, entry = lots.lot(IDS[0], meta, live)
    assert lots.evaluated(IDS[0], entry[0], (), START, None, 1) is None  # no view built yet
    view = lots.view(lot, {"ev": 1}, START, entry)  # free: standard 6, ev 0
    _, entry = lots.lot(IDS[0], meta, live)
    held = ("ev", 1)
    assert lots.evaluated(IDS[0], entry[0], held, START, None, 6) == (30.2, 120.1, True, view)
    assert lots.evaluated(IDS[0], entry[0], held, START, None, 7)[2] is False  # type: ignore[index]
    assert lots.evaluated(IDS[0], entry[0], held, START, "ev", 1)[2] is False  # type: ignore[index]
    assert lots.evaluated(IDS[0], entry[0], held, START, "ev", 0)[2] is True  # type: ignore[index]
    assert lots.evaluated(IDS[0], entry[0], held, START, "accessible", 1)[2] is False  # type: ignore[index]
    stale = START + timedelta(seconds=601)  # no data for too long: unknown, not the view built
    assert lots.evaluated(IDS[0], entry[0], held, stale, None, 1) is None
    night = START + timedelta(hours=7)  # 22:00 in Shanghai: closed, the data still fresh
    live_night = state(1, 4, night)
    lot, entry = lots.lot(IDS[0], meta, live_night)
    view = lots.view(lot, {}, night, entry)
    assert loads(view)["status"] == "closed"
    _, entry = lots.lot(IDS[0], meta, live_night)
    assert lots.evaluated(IDS[0], entry[0], (), night, "standard", 1) == (30.2, 120.1, False, view)
    assert lots.evaluated(IDS[0], entry[0], (), night, "standard", 0)[2] is True  # type: ignore[index]
    assert lots.evaluated(IDS[0], entry[0], ("standard", 1), night, None, 1) is None  # other counts
    later = night + timedelta(hours=11)  # open again, and the data too old: unknown
    assert lots.evaluated(IDS[0], entry[0], (), later, None, 1) is None
    assert lots.evaluated(IDS[1], entry[0], (), night, None, 1) is None  # another lot


def test_it_keeps_about_its_size_and_the_lots_read_lately() -> None:
    lots = _Lots(100, THRESHOLDS)
    meta = meta_json("north", "24/7")
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(1000)]
    kept, _ = lots.lot(ids[0], meta, state(1, 1, START))
    for n, lot_id in enumerate(ids[1:]):
        lots.lot(lot_id, meta, state(1, 1, START))
        if n % 10 == 0:
            assert ids[0] in lots._young or ids[0] in lots._old  # read often: kept
            assert lots.lot(ids[0], meta, state(1, 1, START))[0] == kept
    assert len(lots._young) + len(lots._old) <= 100
    for generation in (lots._young, lots._old, lots._dropped):
        assert ids[1] not in generation  # read once, long ago: dropped


def test_a_dropped_generation_is_freed_two_entries_at_each_new_one() -> None:
    lots = _Lots(100, THRESHOLDS)  # generations of 50
    meta = meta_json("north", "24/7")
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(125)]
    for lot_id in ids[:101]:  # the 101st lot starts a third generation: the first is dropped
        lots.lot(lot_id, meta, state(1, 1, START))
    assert len(lots._dropped) == 48 and set(lots._dropped) <= set(ids[:50])
    assert len(lots._old) == 50 and len(lots._young) == 1
    for lot_id in ids[101:124]:
        lots.lot(lot_id, meta, state(1, 1, START))
    assert len(lots._dropped) == 2
    lots.lot(ids[124], meta, state(1, 1, START))
    assert not lots._dropped


def test_a_full_cache_leaves_the_garbage_collector_next_to_nothing_to_walk() -> None:
    """A collection stops tracking a tuple of untracked things: the two collections of the
    young generations untrack every entry, so none reaches the oldest generation tracked
    (where each full collection would walk it until one untracks it)."""
    lots = _Lots(10_000, THRESHOLDS)
    meta = meta_json("north", "Mo-Fr 08:00-20:00")
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for n in range(5000):
            lot_id = f"00000000-0000-4000-8000-{n:012d}"
            lot, entry = lots.lot(lot_id, meta, resp2(state(1, n % 10, START)))
            lots.view(lot, {"ev": 1}, START, entry)
        gc.collect(0)  # the youngest generation's collection, then the middle one's
        gc.collect(1)
        assert len(gc.get_objects()) - before < 100
    finally:
        gc.enable()


def test_a_cached_lot_costs_a_few_kilobytes() -> None:
    """orjson's output holds the whole buffer it was written in (4-8 KB): what the cache keeps
    is a copy of the content's size."""
    lots = _Lots(10_000, THRESHOLDS)
    meta = meta_json("north" * 10, "24/7")
    raw = [(f"00000000-0000-4000-8000-{n:012d}", state(1, n % 10, START)) for n in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for lot_id, live in raw:
            lot, entry = lots.lot(lot_id, meta, resp2(live))
            lots.view(lot, {"ev": 1}, START, entry)
        per_lot = (tracemalloc.get_traced_memory()[0] - before) / len(raw)
    finally:
        tracemalloc.stop()
    assert per_lot < 3000, per_lot


def test_a_lot_is_vouched_for_only_if_no_invalidation_came_during_its_read() -> None:
    """Pending before the read, vouched after it unless Redis invalidated one of its keys
    meanwhile (that push comes before the read's replies when the change came first, after
    them otherwise: either way what was read may be stale); until its reserved counts expire;
    a flush (no keys) or anything losing pushes forgets every lot."""
    a, b = IDS
    counts = {"standard": 1}
    vouched = _Vouched()
    vouched.reading([a, b])
    assert vouched.get(a, 0.0) is None  # pending
    vouched.invalidated(["invalidate", [f"lot:{a}".encode()]])
    vouched.vouch(a, 2000.0, b"digest-a", counts)
    vouched.vouch(b, 2000.0, b"digest-b", counts)
    assert vouched.get(a, 1000.0) is None
    assert vouched.get(b, 1000.0) == (2000.0, b"digest-b", "standard", 1)
    assert vouched.get(b, 2000.0) is None  # its reserved counts expired
    vouched.vouch(a, 2000.0, b"digest-a", counts)
    assert vouched.get(a, 1000.0) is None  # not read since: nothing to vouch for

    vouched.reading([a])
    vouched.vouch(a, 3000.0, b"digest-a", counts)
    assert vouched.get(a, 1000.0) is not None
    vouched.invalidated(["invalidate", [f"reserved:{a}"]])  # str keys too
    assert vouched.get(a, 1000.0) is None and vouched.get(b, 1000.0) is not None
    vouched.invalidated(["invalidate", None])  # FLUSHALL
    assert vouched.get(b, 1000.0) is None

    vouched.reading([a, b])
    vouched.vouch(a, 3000.0, b"digest-a", counts)
    vouched.forget_all()  # a connection broken: its pushes may be lost
    vouched.vouch(b, 3000.0, b"digest-b", counts)
    assert vouched.get(a, 1000.0) is None and vouched.get(b, 1000.0) is None
