"""Fixtures of the availability tests: an operator row, the service's read path, the stacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from services.availability.readpath import ReadPath
from tests.availability import facts
from tests.stack import RedisServer, Stack


@pytest.fixture
def operator_id(conn: psycopg.Connection[Any]) -> str:
    return facts.operator(conn)


@pytest.fixture
def lookups(availability_app: Any) -> ReadPath:
    """The availability app's read path (this process), for refills and direct reads."""
    rp: ReadPath = availability_app.extensions["availability"]
    return rp


@pytest.fixture
def complete_geo(lookups: ReadPath, redis_client: redis.Redis) -> ReadPath:
    """Redis refilled from PostgreSQL, with its geo index vouched complete."""
    lookups.refill(redis_client)
    return lookups


@pytest.fixture
def own_stack(
    request: pytest.FixtureRequest, database_url: str, own_redis: RedisServer, tmp_path: Path
) -> Iterator[Stack]:
    """The processes the test module names in ``OWN_STACK`` (with ``OWN_STACK_ENV``) against
    ``own_redis``, which the test may flush, stop or start."""
    stack = Stack(
        database_url,
        own_redis.url,
        tmp_path / "stack",
        env_overrides=getattr(request.module, "OWN_STACK_ENV", {}),
        names=request.module.OWN_STACK,
    )
    with stack:
        yield stack
