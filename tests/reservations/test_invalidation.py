"""A reservation change drops its lot's cached ``reserved`` count; a drop Redis refused is
retried until Redis answers, so the cache's lifetime bound is not what ends a stale count."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import redis

from services.common.reserved import reserved_key
from services.reservations.lifecycle import _invalidations, forget_reserved
from tests.stack import wait_for


def _point_at_nothing(client: redis.Redis, tmp_path: Path) -> dict[str, object]:
    """Make ``client``'s connections go to an address nothing listens on; return the old one."""
    kwargs = client.connection_pool.connection_kwargs
    before = dict(kwargs)
    if "path" in kwargs:
        kwargs["path"] = str(tmp_path / "no-redis.sock")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            kwargs["host"], kwargs["port"] = "127.0.0.1", s.getsockname()[1]
    client.connection_pool.reset()
    return before


def test_a_drop_redis_refused_lands_when_it_answers_again(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    lot_id = str(uuid.uuid4())
    key = reserved_key(lot_id)
    redis_client.hset(key, mapping={"_ok": "1", "standard": "2"})
    writer = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    address = _point_at_nothing(writer, tmp_path)

    forget_reserved(writer, [lot_id])  # Redis is down: the change must not fail

    assert redis_client.hgetall(key) == {"_ok": "1", "standard": "2"}
    assert key in _invalidations.pending()

    # Redis answers at its address again: the retry drops the count without another change
    writer.connection_pool.connection_kwargs.update(address)
    writer.connection_pool.reset()
    wait_for(lambda: not redis_client.exists(key), timeout=15, what="the retried drop")
    assert key not in _invalidations.pending()


def test_a_drop_that_lands_leaves_nothing_to_retry(redis_client: redis.Redis) -> None:
    lot_id = str(uuid.uuid4())
    key = reserved_key(lot_id)
    redis_client.hset(key, mapping={"_ok": "1"})
    forget_reserved(redis_client, [lot_id])
    assert not redis_client.exists(key)
    assert key not in _invalidations.pending()
