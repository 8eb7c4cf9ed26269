"""The worker's copy of the geo index answers as Redis' GEOSEARCH does: the same positions
(decoded from the same scores), the same members in the same order at the same distances."""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from services.availability.domain import haversine_m
from services.availability.geoindex import GeoIndex, positions
from services.common import livestate
from tests.availability import facts


def _near(rng: random.Random, lat: float, lon: float, spread_m: float) -> tuple[float, float]:
    dlat = (rng.random() - 0.5) * spread_m / 111_000
    dlon = (rng.random() - 0.5) * spread_m / (111_000 * max(0.05, math.cos(math.radians(lat))))
    return max(-85.0, min(85.0, lat + dlat)), max(-180.0, min(180.0, lon + dlon))


def test_it_answers_as_geosearch_does(redis_client: redis.Redis) -> None:
    """A dense city, a sparse suburb, a cluster at one point, lots near the antimeridian and
    far north: every answer the copy gives is GEOSEARCH's (those it leaves to Redis are the
    boxes over the antimeridian or too many cells)."""
    rng = random.Random(11)
    key = f"test:geo:{uuid.uuid4().hex}"
    places = [(30.25, 120.15, 8_000, 3000), (30.6, 120.6, 60_000, 500), (31.0, 121.0, 1, 40)]
    places += [(-16.5, 179.99, 4_000, 200), (70.0, 25.0, 5_000, 200)]
    points = []
    for lat, lon, spread, n in places:
        points += [_near(rng, lat, lon, spread) for _ in range(n)]
    members = {f"lot-{i}": p for i, p in enumerate(points)}
    redis_client.geoadd(key, [v for m, (lat, lon) in members.items() for v in (lon, lat, m)])
    try:
        pairs = redis_client.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
        if pairs and not isinstance(pairs[0], list | tuple):  # RESP2: flat
            pairs = list(zip(pairs[::2], pairs[1::2], strict=True))
        decoded = positions(pairs)
        assert len(decoded) == len(members)
        for member, lon, lat in rng.sample(decoded, 200):
            ((rlon, rlat),) = redis_client.geopos(key, member)
            assert (lon, lat) == (float(rlon), float(rlat))
        index = GeoIndex.build(decoded)
        answered = 0
        for lat, lon, spread, _ in places:
            for _ in range(60):
                qlat, qlon = _near(rng, lat, lon, spread * 1.2)
                radius = rng.choice((50.0, 300.0, 1000.0, 5000.0))
                count = rng.choice((1, 5, 26))
                first = radius / rng.choice((1, 2, 8))
                mine = index.nearest(qlon, qlat, radius, count, first)
                if mine is None:
                    continue
                answered += 1
                theirs = redis_client.execute_command(
                    "GEOSEARCH", key, "FROMLONLAT", qlon, qlat, "BYRADIUS", radius, "m",
                    "ASC", "COUNT", count, "WITHDIST",
                )  # fmt: skip
                theirs = [(m.decode() if isinstance(m, bytes) else m, float(d)) for m, d in theirs]
                assert len(mine) == len(theirs), (qlat, qlon, radius, count)
                for (_, d), (_, rd) in zip(mine, theirs, strict=True):
                    assert abs(d - rd) < 1e-3
                # the same members, but for the order of those at the same distance (lots at
                # one point) and which of them make the count
                last = mine[-1][1] - 1e-3 if mine else 0.0
                assert {m for m, d in mine if d < last} == {m for m, d in theirs if d < last}
        assert answered >= 200
    finally:
        redis_client.delete(key)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(0, 300),
    radius=st.floats(1.0, 20_000.0),
    count=st.integers(1, 40),
    first=st.floats(1.0, 20_000.0),
)
def test_it_finds_the_nearest_within_the_radius(
    seed: int, n: int, radius: float, count: int, first: float
) -> None:
    """Against ranking every member by haversine: the ``count`` nearest within the radius
    (the distance ties aside), whatever the first radius tried."""
    rng = random.Random(seed)
    pts = [(f"m{i}", *reversed(_near(rng, 30.25, 120.15, 10_000))) for i in range(n)]
    index = GeoIndex.build(pts)
    qlat, qlon = _near(rng, 30.25, 120.15, 12_000)
    got = index.nearest(qlon, qlat, radius, count, first)
    if got is None:  # a box over too many cells: Redis answers it
        return
    ranked = sorted(
        (haversine_m(qlat, qlon, lat, lon), m) for m, lon, lat in pts
        if haversine_m(qlat, qlon, lat, lon) <= radius
    )  # fmt: skip
    if len(got) < count:
        assert len(got) == len(ranked)
    assert [m for m, _ in got] == [m for _, m in ranked[: len(got)]]
    for (_, d), (rd, _) in zip(got, ranked, strict=False):
        assert abs(d - rd) < 1e-6


def test_a_worker_copies_the_geo_index_only_up_to_its_bound(
    lookups: Any, redis_client: redis.Redis, conn: Any, operator_id: str
) -> None:
    """The read path's copy holds every member of Redis' index; past
    ``PARKING_AVAILABILITY_GEO_COPY_MAX`` no copy is made (GEOSEARCH answers), and 0 means
    never, not even a first read."""
    lat, lon = facts.somewhere()
    for n in range(3):
        facts.lot(conn, operator_id, lat=lat + n * 0.001, lon=lon, client=redis_client)
    lookups.refill(redis_client)
    size = int(redis_client.zcard(livestate.GEO_KEY))
    assert size > 0
    lookups._copy_geo(redis_client)
    assert lookups._vouched.geo is not None and lookups._vouched.geo.size == size
    lookups._vouched.forget_all()
    lookups.tuning = lookups.tuning.model_copy(
        update={"geo_copy_max": size - 1, "refill_chunk": 100}
    )
    lookups._copy_geo(redis_client)
    assert lookups._vouched.geo is None
    lookups.tuning = lookups.tuning.model_copy(update={"geo_copy_max": 0})
    lookups._next_geo_build = 0.0
    lookups._want_geo(redis_client)
    assert not lookups._geo_building
