"""The Celery app factory: Redis broker, late acks, prefetch 1, JSON only."""

from __future__ import annotations

from celery import Celery

from services.common.config import CommonSettings
from services.common.redis import celery_broker_url


def make_celery(name: str, settings: CommonSettings) -> Celery:
    app = Celery(name, broker=celery_broker_url(settings.redis_url))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 300},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue="parking",
    )
    return app
