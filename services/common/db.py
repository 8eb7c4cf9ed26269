"""The PostgreSQL pool: one per process, opened lazily after gunicorn forks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.common.config import CommonSettings


class Database:
    """Owns a psycopg_pool.ConnectionPool, created on first use in the current process."""

    def __init__(self, settings: CommonSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    self._pool = self._open()
                    self._pid = os.getpid()
        return self._pool

    def _open(self) -> ConnectionPool:
        s = self.settings
        options = f"-c statement_timeout={s.db_statement_timeout_ms}"
        pool = ConnectionPool(
            conninfo=s.database_url,
            min_size=s.db_pool_min_size,
            max_size=s.db_pool_max_size,
            timeout=s.db_pool_timeout_s,
            kwargs={"autocommit": True, "options": options, "application_name": self.name},
            name=self.name,
            open=False,
            reconnect_timeout=30,
            max_idle=120,
        )
        pool.open(wait=False)
        return pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode; use ``conn.transaction()`` for atomic work."""
        with self.pool.connection() as conn:
            yield conn

    @contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """A dict-row cursor on a pooled connection."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    def ping(self) -> None:
        with self.pool.connection(timeout=1.0) as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None


class PoolStatsCollector(Collector):
    """Exports psycopg_pool.get_stats() of every Database in the process."""

    def __init__(self) -> None:
        self.databases: list[Database] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "parking_db_pool", "psycopg_pool statistics", labels=["pool", "stat"]
        )
        for db in self.databases:
            if db._pool is None or db._pid != os.getpid():
                continue
            for stat, value in db._pool.get_stats().items():
                gauge.add_metric([db.name, stat], float(value))
        yield gauge


POOL_STATS = PoolStatsCollector()
REGISTRY.register(POOL_STATS)


def url_with_database(url: str, database: str) -> str:
    """``url`` (a postgresql:// URL) pointing at another database on the same server."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))
