"""The Redis client: one connection pool per process, created after the fork."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from services.common.config import CommonSettings


class RedisClient:
    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._client: redis.Redis | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = connect(self.settings.redis_url, self.settings.redis_timeout_s)
                    self._pid = os.getpid()
        return self._client

    def ping(self) -> None:
        self.client.ping()


def connect(url: str, timeout_s: float = 0.5) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// or unix://) with short timeouts."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        decode_responses=True,
    )


class ScriptRunner:
    """One Lua script run over connections of its own, each used by one caller at a time.

    redis-py's ``Script.__call__`` goes through layers per call that cost more CPU than the
    script on the platform's hottest read (lot detail): a pool checkout that polls the socket
    for stray bytes, a retry wrapper, observability hooks. This sends the same ``EVALSHA`` on a
    redis-py connection it holds (made by the client's pool, so with its URL, timeouts and
    decoding), loading the script once when Redis does not know it. A connection that failed in
    any way is disconnected, never reused; the error is redis-py's own.
    """

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.pool = client.connection_pool
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis' script id
        self._idle: list[Any] = []

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self.pool.make_connection()
        try:
            conn.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
            try:
                reply = conn.read_response()
            except NoScriptError:
                conn.send_command("SCRIPT", "LOAD", self.source)
                conn.read_response()
                conn.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
                reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        self._idle.append(conn)
        return reply


def celery_broker_url(url: str) -> str:
    """Kombu spells Unix socket URLs ``redis+socket://``."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url
