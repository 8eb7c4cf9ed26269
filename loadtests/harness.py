"""What every benchmark shares: a local stack on 127.0.0.1 and a uniform report.

Benchmarks start their own servers (embedded PostgreSQL and Redis unless BENCH_DATABASE_URL /
BENCH_REDIS_URL are given) and the Procfile's processes, and stop everything they started.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.common import devstack
from tests.stack import Client, Stack, create_database, drop_database


@contextmanager
def bench_database(base: Path) -> Iterator[str]:
    """A fresh, migrated database, on an embedded PostgreSQL in ``base`` unless
    BENCH_DATABASE_URL names a server; dropped, and the embedded server stopped, at the end."""
    handles: list[Any] = []
    pg_url = os.environ.get("BENCH_DATABASE_URL")
    if not pg_url:
        pg_url, pg = devstack.start_postgres(base / "postgresql", database="postgres")
        handles.append(pg)
    try:
        db_url = create_database(pg_url)
        try:
            yield db_url
        finally:
            drop_database(pg_url, db_url)
    finally:
        devstack.Servers(pg_url, "", handles).stop()


@contextmanager
def bench_stack(names: tuple[str, ...] | None = None, **env: str) -> Iterator[tuple[Stack, Client]]:
    """A running stack (all processes unless ``names``) and an admin client."""
    with (
        tempfile.TemporaryDirectory(prefix="parking-bench-") as tmp,
        bench_database(Path(tmp)) as db_url,
    ):
        base = Path(tmp)
        handles: list[Any] = []
        redis_url = os.environ.get("BENCH_REDIS_URL")
        if not redis_url:
            redis_url, rs = devstack.start_redis(base / "redis")
            handles.append(rs)
        stack = Stack(db_url, redis_url, base / "stack", env_overrides=env)
        if names:
            stack.names = names
        try:
            stack.start()
            yield stack, Client(stack.url, stack.admin_key)
        finally:
            stack.stop()
            devstack.Servers(db_url, redis_url, handles).stop()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(latencies_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }


def report(title: str, rows: dict[str, Any]) -> None:
    """Print one block of figures, ``name: value`` per line."""
    print(f"== {title}")
    for name, value in rows.items():
        print(f"  {name}: {value}")
