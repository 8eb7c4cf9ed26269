"""The ``parking`` command as an admin runs it: a real process against the real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from services.common import livestate
from services.common.db import url_with_database
from services.common.redis import connect
from services.common.seed import DEMO_CITY, DEMO_OPERATORS
from tests.stack import ROOT, Client, Stack, create_database, drop_database
from tests.stack import test_secrets as make_secrets

pytestmark = pytest.mark.e2e

# a Redis database of its own for the seeded database's live state: the session stack's lives in 0
SEED_REDIS_DB = 13


def parking(*args: str, database_url: str, redis_url: str | None = None) -> Any:
    """Run ``parking ARGS``; its stdout parsed as JSON (it must exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
    env.pop("REDIS_URL", None)
    env.update(make_secrets(), DATABASE_URL=database_url)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"parking {' '.join(args)}: {done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.fixture
def empty_database(servers: tuple[str, str]) -> Iterator[str]:
    """A database with no tables at all (not migrated)."""
    name = f"parking_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers[0], autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_with_database(servers[0], name)
    yield url
    drop_database(servers[0], url)


@pytest.fixture
def fresh_database(servers: tuple[str, str]) -> Iterator[str]:
    url = create_database(servers[0])
    yield url
    drop_database(servers[0], url)


def test_migrate_twice_is_idempotent(empty_database: str) -> None:
    first = parking("migrate", database_url=empty_database)
    assert first["applied"], first  # every migration, on an empty database
    second = parking("migrate", database_url=empty_database)
    assert second == {"applied": []}
    with psycopg.connect(empty_database) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename = ANY(%s)",
            (["operators", "lots", "lot_live", "api_keys"],),
        ).fetchone()
    assert tables == (4,)


def test_create_city_key_prints_a_key_that_reads_the_city_snapshot(
    stack: Stack, database_url: str, redis_url: str
) -> None:
    name = f"CLI city {uuid.uuid4().hex[:6]}"
    created = parking("admin", "create-city-key", name, database_url=database_url)
    assert created["name"] == name and created["api_key"].startswith("pk_city_")
    city = Client(stack.url, created["api_key"])
    try:
        resp = city.get("/v1/city/snapshot")
        assert resp.status_code == 200, resp.text
        assert {"generated_at", "totals", "districts", "lots"} <= set(resp.json())
        # a city key is not an operator's
        assert city.get("/v1/lots?mine=1").status_code == 403
    finally:
        city.session.close()
    wrong = Client(stack.url, created["api_key"] + "x")
    try:
        assert wrong.get("/v1/city/snapshot").status_code == 401
    finally:
        wrong.session.close()


def _demo_counts(url: str) -> tuple[int, int, int]:
    """(demo operators, their live lots, demo city clients) in the database at ``url``."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM operators WHERE name = ANY(%(ops)s)),"
            " (SELECT count(*) FROM lots l JOIN operators o ON o.id = l.operator_id"
            "  WHERE o.name = ANY(%(ops)s) AND l.deleted_at IS NULL),"
            " (SELECT count(*) FROM city_clients WHERE name = %(city)s)",
            {"ops": list(DEMO_OPERATORS), "city": DEMO_CITY},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_seed_demo_creates_about_fifty_lots_once(fresh_database: str, redis_url: str) -> None:
    seed_redis = f"{redis_url}{'&' if '?' in redis_url else '?'}db={SEED_REDIS_DB}"
    client = connect(seed_redis, 5.0)
    client.flushdb()
    try:
        first = parking("seed", "--demo", database_url=fresh_database, redis_url=seed_redis)
        operators, lots, cities = _demo_counts(fresh_database)
        assert operators == len(DEMO_OPERATORS) and cities == 1
        assert 40 <= lots <= 60, lots
        assert first["lots_created"] == lots
        assert {o["name"] for o in first["operators"]} == set(DEMO_OPERATORS)
        assert first["city"]["name"] == DEMO_CITY
        assert all(o["api_key"].startswith("pk_operator_") for o in first["operators"])
        assert first["city"]["api_key"].startswith("pk_city_")
        # the lots are in Redis' live state too (the availability read side)
        assert client.zcard(livestate.GEO_KEY) == lots

        # a second run finds the demo operators and their lots: no duplicates, fresh keys
        second = parking("seed", "--demo", database_url=fresh_database, redis_url=seed_redis)
        assert second["lots_created"] == 0
        assert _demo_counts(fresh_database) == (operators, lots, cities)
        assert {o["id"] for o in second["operators"]} == {o["id"] for o in first["operators"]}
        assert second["city"]["id"] == first["city"]["id"]
        assert {o["api_key"] for o in second["operators"]}.isdisjoint(
            o["api_key"] for o in first["operators"]
        )
        assert client.zcard(livestate.GEO_KEY) == lots
    finally:
        client.flushdb()
        client.close()
