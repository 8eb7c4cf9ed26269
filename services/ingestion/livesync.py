"""Keeps Redis' live state in step with PostgreSQL, without ever failing a request over Redis.

PostgreSQL commits first; then the committed states are written to Redis with their versions.
When Redis does not answer, the lots are remembered in a bounded in-process "dirty" set and
written again from PostgreSQL on the next successful write, or by a background check within a
second. A Redis that lost its data (restarted empty) is noticed by a marker key it no longer
holds, and rebuilt whole from PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

import redis

from services.common import livestate
from services.common.db import Database
from services.common.redis import RedisClient
from services.ingestion import registry

log = logging.getLogger("parking.ingestion.livesync")


class LiveSync:
    """One per process: writes after commit, remembers failures, repairs when Redis is back."""

    def __init__(
        self,
        db: Database,
        redis_client: RedisClient,
        *,
        max_dirty: int = 10_000,
        check_interval_s: float = 1.0,
    ) -> None:
        self.db = db
        self.redis = redis_client
        self.max_dirty = max_dirty
        self.check_interval_s = check_interval_s
        self._dirty: set[str] = set()
        self._everything = False  # the dirty set overflowed, or Redis lost its data
        self._lock = threading.Lock()
        self._repair_lock = threading.Lock()
        self._checked_at = 0.0
        self._thread_pid = 0
        # after a failure, requests skip Redis for a moment (no timeout per request while it
        # is unreachable); the background check keeps trying
        self._down_until = 0.0

    # writes ---------------------------------------------------------------------------------

    def publish(self, states: list[livestate.LotState]) -> None:
        """Write committed lot states (after the commit); never raises."""
        self.ensure_watching()
        if not states:
            return
        if time.monotonic() < self._down_until:
            self._remember([s.lot_id for s in states])
            return
        try:
            livestate.apply_states(self.redis.client, states)
        except redis.RedisError as exc:
            self._failed([s.lot_id for s in states], exc)
            return
        if self._dirty or self._everything:
            self.repair()

    def lots_changed(self, lot_ids: list[str]) -> None:
        """Write the registry summary and state of lots just created, changed or deleted."""
        self.ensure_watching()
        if time.monotonic() < self._down_until:
            self._remember(lot_ids)
            return
        try:
            with self.db.connection() as conn:
                registry.resync(conn, self.redis.client, lot_ids=lot_ids)
        except redis.RedisError as exc:
            self._failed(lot_ids, exc)
            return
        if self._dirty or self._everything:
            self.repair()

    @property
    def dirty(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._dirty)

    def _failed(self, lot_ids: Iterable[str], exc: Exception) -> None:
        log.warning("redis write failed (%s); the lots will be written again", type(exc).__name__)
        self._down_until = time.monotonic() + self.check_interval_s
        self._remember(lot_ids)

    def _remember(self, lot_ids: Iterable[str]) -> None:
        with self._lock:
            self._dirty.update(lot_ids)
            if len(self._dirty) > self.max_dirty:
                self._dirty.clear()
                self._everything = True

    # repair ---------------------------------------------------------------------------------

    def repair(self) -> bool:
        """Write the dirty lots (or everything) from PostgreSQL; True if Redis is in step."""
        if not self._repair_lock.acquire(blocking=False):
            return False  # another thread of this process is at it
        try:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                everything, self._everything = self._everything, False
            try:
                client = self.redis.client
                if not everything and not client.exists(registry.SYNCED_KEY):
                    everything = True
                with self.db.connection() as conn:
                    if everything:
                        count = registry.sync_all(conn, client)
                        log.info("rebuilt the live state of %d lots from PostgreSQL", count)
                    elif dirty:
                        registry.resync(conn, client, lot_ids=sorted(dirty))
            except Exception as exc:
                with self._lock:
                    self._dirty |= dirty
                    self._everything |= everything
                if isinstance(exc, redis.RedisError):
                    self._down_until = time.monotonic() + self.check_interval_s
                    return False
                log.warning("live state repair failed: %s", type(exc).__name__)
                return False
            self._down_until = 0.0
            return True
        finally:
            self._checked_at = time.monotonic()
            self._repair_lock.release()

    def ensure_watching(self) -> None:
        """Start this process' background check (after gunicorn's fork, on first use)."""
        if self._thread_pid == os.getpid():
            return
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
        threading.Thread(target=self._watch, name="livesync", daemon=True).start()

    def _watch(self) -> None:
        pid = os.getpid()
        while self._thread_pid == pid:
            time.sleep(self.check_interval_s / 2)
            if time.monotonic() - self._checked_at >= self.check_interval_s:
                try:
                    self.repair()
                except Exception:  # the watcher must outlive any one failure
                    log.exception("live state watcher")


def live_sync() -> LiveSync:
    """The current app's LiveSync."""
    from flask import current_app

    sync: LiveSync = current_app.extensions["parking_livesync"]
    return sync
