"""Fixtures of the availability tests: an operator row, the service's read path, the stack."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis

from services.availability.readpath import ReadPath
from tests.availability import facts


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
