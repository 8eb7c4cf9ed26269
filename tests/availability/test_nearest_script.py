"""The geo script of nearby search against the real Redis: whatever radius it starts from, it
returns what one GEOSEARCH over the whole radius returns (the ``count`` nearest, or all of them
when fewer are within), and the keys of exactly the members a search reads."""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import pytest
import redis

from services.availability.domain import GEO_MARGIN_M
from services.availability.readpath import _NEAREST, _Reach
from services.common.redis import ScriptRunner

CENTER = (30.25, 120.15)


@pytest.fixture
def dense(redis_client: redis.Redis) -> tuple[str, str]:
    """3,000 members within 2 km of the centre, denser towards it; the keys are removed after."""
    marker, geo = f"test:complete:{uuid.uuid4().hex}", f"test:geo:{uuid.uuid4().hex}"
    rng = random.Random(11)
    members: list[float | str] = []
    for n in range(3000):
        d = 2000 * rng.random() ** 2
        bearing = rng.uniform(0, 2 * math.pi)
        lat = CENTER[0] + d * math.cos(bearing) / 111_195.0
        lon = CENTER[1] + d * math.sin(bearing) / (111_195.0 * math.cos(math.radians(CENTER[0])))
        members += [lon, lat, f"m{n}"]
    redis_client.geoadd(geo, members)  # type: ignore[arg-type]
    redis_client.set(marker, "1")
    yield marker, geo
    redis_client.delete(marker, geo)


@pytest.fixture
def prefixes(redis_client: redis.Redis) -> tuple[str, str, str]:
    """Key prefixes of the members' summaries, live and reserved hashes, each member's keys
    naming it (m0..m2999); removed after."""
    names = tuple(f"test:{kind}:{uuid.uuid4().hex}:" for kind in ("meta", "lot", "held"))
    pipe = redis_client.pipeline(transaction=False)
    for n in range(3000):
        pipe.set(f"{names[0]}m{n}", f"summary of m{n}")
        pipe.hset(f"{names[1]}m{n}", mapping={"v": str(n), "o:ev": "1"})
        if n % 2:
            pipe.hset(f"{names[2]}m{n}", mapping={"_ok": "1", "ev": str(n % 7)})
    pipe.execute()
    yield names
    for name in names:
        redis_client.delete(*(f"{name}m{n}" for n in range(3000)))


def nearest(
    script: ScriptRunner,
    keys: list[str],
    lon: float,
    lat: float,
    radius: float,
    count: int,
    first: float,
    min_d: float = 0.0,
    page: int = 0,
    prefixes: tuple[str, str, str] = ("test:none:", "test:none:", "test:none:"),
) -> Any:
    return script(
        keys=keys, args=[lon, lat, radius, count, first, min_d, page, GEO_MARGIN_M, *prefixes]
    )


def whole(client: redis.Redis, geo: str, lon: float, lat: float, radius: float, count: int) -> list:
    return client.execute_command(
        "GEOSEARCH", geo, "FROMLONLAT", lon, lat, "BYRADIUS", radius, "m",
        "ASC", "COUNT", count, "WITHDIST",
    )  # fmt: skip


@pytest.mark.parametrize("first", [1.0, 37.0, 400.0, 5000.0])
def test_any_first_radius_finds_what_the_whole_radius_does(
    redis_client: redis.Redis, dense: tuple[str, str], first: float
) -> None:
    marker, geo = dense
    script = ScriptRunner(redis_client, _NEAREST)
    rng = random.Random(int(first))
    for _ in range(25):
        lat = CENTER[0] + rng.uniform(-0.02, 0.02)
        lon = CENTER[1] + rng.uniform(-0.02, 0.02)
        radius = rng.choice([50.0, 300.0, 1000.0, 2500.0])
        count = rng.choice([1, 6, 26, 200])
        hits, skipped, _ = nearest(script, [marker, geo], lon, lat, radius, count, first)
        assert hits == whole(redis_client, geo, lon, lat, radius, count), (lat, lon, radius, count)
        assert skipped == 0


def test_it_reads_the_members_from_the_min_distance_to_past_the_page_by_twice_the_margin(
    redis_client: redis.Redis, dense: tuple[str, str], prefixes: tuple[str, str, str]
) -> None:
    marker, geo = dense
    script = ScriptRunner(redis_client, _NEAREST)
    rng = random.Random(5)
    for _ in range(40):
        lat = CENTER[0] + rng.uniform(-0.02, 0.02)
        lon = CENTER[1] + rng.uniform(-0.02, 0.02)
        radius, count = rng.choice([50.0, 300.0, 1000.0]), rng.choice([6, 26, 200])
        min_d, page = rng.choice([0.0, 20.0, 150.0]), rng.choice([0, 1, 5, 21])
        hits, skipped, data = nearest(
            script, [marker, geo], lon, lat, radius, count, 100.0, min_d, page, prefixes
        )
        distances = [float(d) for _, d in hits]
        assert skipped == sum(d < min_d for d in distances)
        read = skipped + len(data) // 3
        assert len(data) % 3 == 0 and read <= len(hits)
        if page and read - skipped > page:
            cutoff = distances[skipped + page - 1] + 2 * GEO_MARGIN_M
            assert all(d <= cutoff for d in distances[skipped:read])
        if page and read < len(hits):
            assert distances[read] > distances[skipped + page - 1] + 2 * GEO_MARGIN_M
        if not page:
            assert read == len(hits)  # no page: every member from the min distance on
        for n, (member, _) in enumerate(hits[skipped:read]):
            summary, live, held = data[3 * n : 3 * n + 3]
            number = int(member[1:])
            assert summary == f"summary of {member}"
            assert dict(zip(live[::2], live[1::2], strict=True)) == {"v": str(number), "o:ev": "1"}
            assert held == ([] if number % 2 == 0 else ["_ok", "1", "ev", str(number % 7)])


def test_without_the_completeness_marker_it_answers_nothing(
    redis_client: redis.Redis, dense: tuple[str, str]
) -> None:
    marker, geo = dense
    redis_client.delete(marker)
    script = ScriptRunner(redis_client, _NEAREST)
    assert nearest(script, [marker, geo], CENTER[1], CENTER[0], 1000, 26, 100) is None


def test_the_first_radius_follows_the_density_seen_and_never_passes_the_search_radius() -> None:
    reach = _Reach()
    assert reach.radius_for(26, 1000.0) == 1000.0  # nothing seen yet: the whole radius
    for _ in range(20):
        reach.saw(26, 200.0)  # 26 lots within 200 m
    assert 200.0 < reach.radius_for(26, 1000.0) < 300.0
    assert 400.0 < reach.radius_for(104, 1000.0) < 600.0  # four times the lots: twice as far
    assert reach.radius_for(10_000, 1000.0) == 1000.0
