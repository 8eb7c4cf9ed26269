"""Periodic and on-demand tasks: thin wrappers that re-read state and call domain functions.

Every task is an idempotent recomputation from PostgreSQL (acks late, so a task whose worker
dies is delivered again and simply runs again).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
import urllib3
from celery import shared_task
from celery.signals import worker_process_init

from services.common.redis import RedisClient
from services.worker import maintenance, rollups, webhooks
from services.worker import reconcile as reconciliation
from services.worker.app import db, settings

log = logging.getLogger("parking.worker")
TRANSIENT = (OSError, psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError)
live = RedisClient(settings)
_http: urllib3.PoolManager | None = None


def http() -> urllib3.PoolManager:
    global _http
    if _http is None:
        _http = urllib3.PoolManager(num_pools=32, maxsize=8)
    return _http


@worker_process_init.connect
def _serve_metrics(**_: object) -> None:
    """The reconciliation gauges, on a port of their own (the worker has no HTTP server)."""
    if settings.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.metrics_port, addr="127.0.0.1")
        except OSError:
            log.warning("metrics port in use", extra={"port": settings.metrics_port})


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
    with db.connection() as conn:
        result = rollups.rollup_recent(
            conn,
            lookback_minutes=settings.rollup_lookback_minutes,
            max_backfill_minutes=settings.rollup_max_backfill_minutes,
            oldest=datetime.now(UTC) - timedelta(days=settings.bucket_1m_retention_days),
        )
    log.info("rollup", extra=result)
    return result


@shared_task(autoretry_for=(*TRANSIENT, rollups.RollupBusy), retry_backoff=True, max_retries=5)
def rollup_range(start: str, end: str) -> int:
    """Recompute every bucket of ``[start, end)`` (RFC 3339), e.g. after a backfill."""
    with db.connection() as conn, rollups.rollup_lock(conn):
        written = rollups.recompute(
            conn, start=datetime.fromisoformat(start), end=datetime.fromisoformat(end)
        )
    log.info("rollup range", extra={"start": start, "end": end, "written": written})
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
