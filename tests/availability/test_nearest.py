"""The geo lookup of nearby search against the real Redis: whatever radius it starts from, it
returns what one GEOSEARCH over the whole radius returns (the ``count`` nearest, or all of them
when fewer are within)."""

from __future__ import annotations

import math
import random
import uuid

import pytest
import redis

from services.availability.readpath import _Reach, nearest
from services.common.redis import AutoPipeline

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
    run = AutoPipeline(redis_client)
    rng = random.Random(int(first))
    for _ in range(25):
        lat = CENTER[0] + rng.uniform(-0.02, 0.02)
        lon = CENTER[1] + rng.uniform(-0.02, 0.02)
        radius = rng.choice([50.0, 300.0, 1000.0, 2500.0])
        count = rng.choice([1, 6, 26, 200])
        got = nearest(run, lon, lat, radius, count, first, keys=(marker, geo))
        assert got == whole(redis_client, geo, lon, lat, radius, count), (lat, lon, radius, count)


def test_without_the_completeness_marker_it_answers_nothing(
    redis_client: redis.Redis, dense: tuple[str, str]
) -> None:
    marker, geo = dense
    redis_client.delete(marker)
    run = AutoPipeline(redis_client)
    assert nearest(run, CENTER[1], CENTER[0], 1000, 26, 100, keys=(marker, geo)) is None


def test_the_first_radius_follows_the_density_seen_and_never_passes_the_search_radius() -> None:
    reach = _Reach()
    assert reach.radius_for(26, 1000.0) == 1000.0  # nothing seen yet: the whole radius
    for _ in range(20):
        reach.saw(26, 200.0)  # 26 lots within 200 m
    assert 200.0 < reach.radius_for(26, 1000.0) < 300.0
    assert 400.0 < reach.radius_for(104, 1000.0) < 600.0  # four times the lots: twice as far
    assert reach.radius_for(10_000, 1000.0) == 1000.0
