"""Periodic and on-demand tasks: thin wrappers that re-read state and call domain functions.

Every task is an idempotent recomputation from PostgreSQL (acks late, so a task whose worker
dies is delivered again and simply runs again).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
import urllib3
from celery import shared_task

from services.common.celery_app import TASK_SOFT_TIME_LIMIT_S
from services.common.redis import RedisClient
from services.worker import maintenance, rollups, webhooks
from services.worker import reconcile as reconciliation
from services.worker.app import db, settings

log = logging.getLogger("parking.worker")
TRANSIENT = (OSError, psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError)
live = RedisClient(settings)
# Long recomputations stop at a chunk boundary after this long, well before the soft time
# limit, and carry on where they stopped: the next tick (rollups) or a follow-up task (ranges).
WORK_BUDGET_S = TASK_SOFT_TIME_LIMIT_S / 2
_http: urllib3.PoolManager | None = None


def http() -> urllib3.PoolManager:
    global _http
    if _http is None:
        _http = urllib3.PoolManager(num_pools=32, maxsize=8)
    return _http


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def maintain_partitions() -> dict[str, int]:
    """Create the event log's daily partitions ahead and drop those past retention."""
    with db.connection() as conn:
        result = maintenance.maintain_partitions(
            conn,
            ahead_days=settings.partitions_ahead_days,
            retention_days=settings.event_retention_days,
        )
    # "created" is a LogRecord attribute: logging refuses it as an extra field
    log.info(
        "event partitions maintained",
        extra={"partitions_created": result["created"], "partitions_dropped": result["dropped"]},
    )
    return result


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def prune_buckets() -> dict[str, int]:
    """Drop buckets past their interval's retention, and old webhook deliveries."""
    now = datetime.now(UTC)
    with db.connection() as conn:
        result = maintenance.prune_buckets(
            conn,
            now=now,
            keep={
                "1m": timedelta(days=settings.bucket_1m_retention_days),
                "15m": timedelta(days=settings.bucket_15m_retention_days),
                "1h": timedelta(days=settings.bucket_1h_retention_days),
            },
        )
        result["deliveries"] = maintenance.prune_deliveries(
            conn, now=now, keep=timedelta(days=settings.webhook_log_retention_days)
        )
    log.info("buckets pruned", extra={f"pruned_{k}": v for k, v in result.items()})
    return result


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def rollup_recent() -> dict[str, Any]:
    """Bring the 1-minute, 15-minute and 1-hour buckets up to date, late events included."""
    deadline = time.monotonic() + WORK_BUDGET_S
    with db.connection() as conn:
        result = rollups.rollup_recent(
            conn,
            lookback_minutes=settings.rollup_lookback_minutes,
            max_backfill_minutes=settings.rollup_max_backfill_minutes,
            oldest=datetime.now(UTC) - timedelta(days=settings.bucket_1m_retention_days),
            deadline=deadline,
        )
    log.info("rollup", extra=result)
    return result


@shared_task(autoretry_for=(*TRANSIENT, rollups.RollupBusy), retry_backoff=True, max_retries=5)
def rollup_range(start: str, end: str) -> int:
    """Recompute every bucket of ``[start, end)`` (RFC 3339), e.g. after a backfill; a range
    longer than one task's time budget is finished by follow-up tasks."""
    deadline = time.monotonic() + WORK_BUDGET_S
    # a busy lock is retried with backoff rather than waited for against the time limit
    with db.connection() as conn, rollups.rollup_lock(conn, timeout_s=WORK_BUDGET_S / 2):
        written, reached = rollups.recompute_until(
            conn,
            start=datetime.fromisoformat(start),
            end=datetime.fromisoformat(end),
            deadline=deadline,
        )
    if reached < datetime.fromisoformat(end):
        # the minutes before ``reached`` are committed: the rest is a task of its own
        rollup_range.delay(reached.isoformat(), end)
    log.info(
        "rollup range",
        extra={"start": start, "end": end, "written": written, "reached": reached.isoformat()},
    )
    return written


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def reconcile() -> dict[str, Any]:
    """Check the live counts against PostgreSQL, repair Redis, report gate drift."""
    with db.connection() as conn:
        result = reconciliation.reconcile(
            conn,
            live.client,
            drift_threshold=settings.drift_threshold,
            retained_since=datetime.now(UTC) - timedelta(days=settings.event_retention_days),
        )
    log.info("reconciled", extra={k: v for k, v in result.items() if k != "drifting"})
    return result


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5)
def webhooks_tick() -> dict[str, int]:
    """Notify lot status changes and district snapshots; send the deliveries that are due."""
    now = datetime.now(UTC)
    with db.connection() as conn:
        changes = webhooks.detect_status_changes(conn, now=now)
        snapshots = webhooks.enqueue_district_snapshots(
            conn, now=now, every_s=settings.district_snapshot_every_s
        )
        sent = webhooks.deliver_due(
            conn,
            http(),
            timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts,
            backoff_s=settings.webhook_backoff_s,
            backoff_max_s=settings.webhook_backoff_max_s,
            allow_private=settings.webhook_allow_private_networks,
        )
    result = {"status_changes": changes, "district_snapshots": snapshots, **sent}
    if changes or snapshots or any(sent.values()):
        log.info("webhooks", extra=result)
    return result
