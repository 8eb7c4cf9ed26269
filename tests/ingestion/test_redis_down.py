"""Redis is a cache: when it is down, events are still accepted and committed, and when it
returns its live state is rebuilt from PostgreSQL (also by ``parking rebuild-cache``).

These tests run their own stack (gateway and ingestion) against their own database and their
own redis-server process, which they stop and restart, so the session's Redis stays up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from services.common import livestate
from services.common.redis import connect
from tests.ingestion.helpers import (
    create_lot,
    gate,
    gate_lot_body,
    occupancy,
    post,
    redis_occupancy,
    space,
    space_lot_body,
)
from tests.stack import (
    Client,
    RedisServer,
    Stack,
    create_database,
    drop_database,
    wait_for,
)


@pytest.fixture
def own_stack(servers: tuple[str, str], own_redis: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    database_url = create_database(servers[0])
    stack = Stack(database_url, own_redis.url, tmp_path / "stack", names=("gateway", "ingestion"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        drop_database(servers[0], database_url)


def _operator(stack: Stack) -> Client:
    admin = Client(stack.url, stack.admin_key)
    resp = admin.post("/v1/admin/operators", json={"name": "Redis-down Co"})
    assert resp.status_code == 201, resp.text
    return Client(stack.url, resp.json()["api_key"])


def _in_step(client: redis.Redis, conn: psycopg.Connection[Any], lot_ids: list[str]) -> bool:
    """Redis holds every lot (meta, geo, counts) as PostgreSQL does."""
    for lot_id in lot_ids:
        if redis_occupancy(client, lot_id) != occupancy(conn, lot_id):
            return False
        if not client.exists(livestate.meta_key(lot_id)):
            return False
    return True


def test_events_are_accepted_while_redis_is_down_and_the_state_rebuilt_when_it_returns(
    own_stack: Stack, own_redis: RedisServer
) -> None:
    operator = _operator(own_stack)
    spaces = create_lot(operator, space_lot_body(4))
    gates = create_lot(operator, gate_lot_body({"standard": 10}))
    assert post(operator, [space(spaces["id"], "A-000", True, 1)])["accepted"] == 1
    client = connect(own_redis.url, 1.0)
    assert redis_occupancy(client, spaces["id"]) == {"standard": 1, "ev": 0}

    own_redis.stop()
    body = post(
        operator,
        [space(spaces["id"], "A-001", True, 2), gate(gates["id"], "entry", 2),
         gate(gates["id"], "entry", 3)],
    )  # fmt: skip
    assert body == {"accepted": 3, "duplicate": 0, "stale": 0, "rejected": []}
    late = create_lot(operator, gate_lot_body({"standard": 4}))
    renamed = operator.patch(f"/v1/lots/{spaces['id']}", json={"name": "Renamed"})
    assert renamed.status_code == 200
    with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
        assert occupancy(conn, spaces["id"]) == {"standard": 2, "ev": 0}
        assert occupancy(conn, gates["id"]) == {"standard": 2}

        own_redis.start()  # empty: no persistence
        client = connect(own_redis.url, 1.0)
        lot_ids = [spaces["id"], gates["id"], late["id"]]
        # no request needed: the ingestion workers notice and rebuild from PostgreSQL
        wait_for(lambda: _in_step(client, conn, lot_ids), timeout=20, what="the rebuild")
        meta = json.loads(client.get(livestate.meta_key(spaces["id"])) or "{}")
        assert meta["name"] == "Renamed"
        city = client.hgetall(livestate.CITY_KEY)
        assert city == {"o": "4", "c": "18"}

        # a worker that saw Redis fail a moment ago leaves the write to its background check
        assert post(operator, [gate(gates["id"], "exit", 5)])["accepted"] == 1
        wait_for(lambda: redis_occupancy(client, gates["id"]) == {"standard": 1}, timeout=10)


def test_writes_redis_missed_while_paused_are_made_again(
    own_stack: Stack, own_redis: RedisServer
) -> None:
    operator = _operator(own_stack)
    lot = create_lot(operator, gate_lot_body({"standard": 10}))
    client = connect(own_redis.url, 5.0)
    wait_for(lambda: redis_occupancy(client, lot["id"]) == {"standard": 0}, timeout=10)
    # Redis keeps its data but does not answer writes for a while (longer than the timeout)
    client.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
    body = post(operator, [gate(lot["id"], "entry", 1), gate(lot["id"], "entry", 2)])
    assert body["accepted"] == 2
    assert "redis write failed" in own_stack.log("ingestion")
    wait_for(
        lambda: redis_occupancy(client, lot["id"]) == {"standard": 2},
        timeout=20,
        what="the missed write to be made again",
    )


def test_parking_rebuild_cache(own_stack: Stack, own_redis: RedisServer) -> None:
    operator = _operator(own_stack)
    lots = [create_lot(operator, space_lot_body(2)), create_lot(operator, gate_lot_body())]
    post(operator, [space(lots[0]["id"], "A-001", True, 1), gate(lots[1]["id"], "entry", 1)])
    client = connect(own_redis.url, 5.0)
    livestate.flush(client)
    assert redis_occupancy(client, lots[0]["id"]) is None
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "rebuild-cache"],
        env=own_stack.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == {"lots": 2}
    with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
        assert _in_step(client, conn, [lot["id"] for lot in lots])
    assert client.geopos(livestate.GEO_KEY, lots[0]["id"])[0] is not None
    assert client.hgetall(livestate.CITY_KEY) == {"o": "2", "c": "9"}
