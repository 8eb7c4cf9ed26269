"""Fixtures: real PostgreSQL and Redis for the whole session, apps, clients and the stack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from services.common import devstack
from services.common.config import (
    AvailabilitySettings,
    GatewaySettings,
    IngestionSettings,
    ReservationsSettings,
)
from tests.stack import (
    Client,
    RedisServer,
    Stack,
    create_database,
    drop_database,
    test_secrets,
)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(PostgreSQL server URL, Redis URL): TEST_DATABASE_URL / TEST_REDIS_URL, or embedded."""
    base = tmp_path_factory.mktemp("servers")
    handles: list[Any] = []
    pg_url = os.environ.get("TEST_DATABASE_URL")
    if not pg_url:
        pg_url, pg = devstack.start_postgres(base / "postgresql", database="postgres")
        handles.append(pg)
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        redis_url, rs = devstack.start_redis(base / "redis")
        handles.append(rs)
    yield pg_url, redis_url
    devstack.Servers(pg_url, redis_url, handles).stop()


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> Iterator[str]:
    """A fresh migrated database for the session."""
    url = create_database(servers[0])
    yield url
    drop_database(servers[0], url)


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    return servers[1]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to flush, stop and start (the session's stays up)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    from services.common.redis import connect

    return connect(redis_url, 5.0)


@pytest.fixture(scope="session")
def secrets_env() -> dict[str, str]:
    return test_secrets()


@pytest.fixture(scope="session")
def env(database_url: str, redis_url: str, secrets_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment the settings classes read, set for the session."""
    values = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, **secrets_env}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _app(kind: str, env: dict[str, str]) -> Any:
    if kind == "ingestion":
        from services.ingestion.app import create_app as ingestion

        return ingestion(IngestionSettings())
    if kind == "availability":
        from services.availability.app import create_app as availability

        return availability(AvailabilitySettings())
    if kind == "reservations":
        from services.reservations.app import create_app as reservations

        return reservations(ReservationsSettings())
    from gateway.app import create_app as gateway

    return gateway(GatewaySettings())


@pytest.fixture
def ingestion_app(env: dict[str, str]) -> Any:
    return _app("ingestion", env)


@pytest.fixture
def availability_app(env: dict[str, str]) -> Any:
    return _app("availability", env)


@pytest.fixture
def reservations_app(env: dict[str, str]) -> Any:
    return _app("reservations", env)


@pytest.fixture(scope="session")
def stack(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole platform as real processes (gateway, services, worker, beat), for the session."""
    s = Stack(database_url, redis_url, Path(tmp_path_factory.mktemp("stack")))
    with s:
        yield s


@pytest.fixture(scope="session")
def admin(stack: Stack) -> Client:
    return Client(stack.url, stack.admin_key)


@pytest.fixture
def anonymous(stack: Stack) -> Client:
    return Client(stack.url)


@pytest.fixture
def new_operator(stack: Stack, admin: Client) -> Any:
    """Make operators on demand: ``new_operator()`` -> (id, Client)."""

    def make(name: str = "operator") -> tuple[str, Client]:
        resp = admin.post("/v1/admin/operators", json={"name": name})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return body["id"], Client(stack.url, body["api_key"])

    return make


@pytest.fixture
def new_city(stack: Stack, admin: Client) -> Any:
    def make(name: str = "city") -> tuple[str, Client]:
        resp = admin.post("/v1/admin/city-keys", json={"name": name})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        return body["id"], Client(stack.url, body["api_key"])

    return make
