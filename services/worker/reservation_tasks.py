"""Periodic reservation tasks: no-show marking and idempotency-key cleanup.

Both are single idempotent statements: running one twice, or on two workers at once, changes
nothing more than running it once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task

from services.common.config import ReservationsSettings, cached
from services.common.redis import RedisClient
from services.reservations import repository
from services.reservations.lifecycle import forget_reserved
from services.worker.app import db, settings

log = logging.getLogger("parking.worker")
_redis = RedisClient(settings)


@shared_task(autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def mark_no_shows() -> int:
    """Confirmed reservations not arrived by start + grace become ``no_show``."""
    grace = timedelta(minutes=cached(ReservationsSettings).no_show_grace_min)
    with db.connection() as conn:
        lot_ids = repository.mark_no_shows(conn, grace=grace)
    forget_reserved(_redis.client, lot_ids)
    if lot_ids:
        log.info("reservations marked no-show", extra={"count": len(lot_ids)})
    return len(lot_ids)


@shared_task(autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def clean_idempotency_keys() -> int:
    """Delete idempotency keys older than their retention (at least 24 hours)."""
    ttl = timedelta(hours=cached(ReservationsSettings).idempotency_ttl_h)
    with db.connection() as conn:
        deleted = repository.delete_idempotency_keys(conn, older_than=ttl)
    log.info("idempotency keys cleaned", extra={"deleted": deleted})
    return deleted
