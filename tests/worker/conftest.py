"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import devstack
from tests.stack import create_database, drop_database


@pytest.fixture
def isolated(servers: tuple[str, str], tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A database and a Redis of the test's own, so no other worker or beat takes its tasks."""
    database_url = create_database(servers[0])
    redis_url, handle = devstack.start_redis(tmp_path / "redis")
    try:
        yield database_url, redis_url
    finally:
        devstack.Servers(database_url, redis_url, [handle]).stop()
        drop_database(servers[0], database_url)
