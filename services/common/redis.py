"""The Redis client: one connection pool per process, created after the fork."""

from __future__ import annotations

import os
import threading

import redis

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


def celery_broker_url(url: str) -> str:
    """Kombu spells Unix socket URLs ``redis+socket://``."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url
