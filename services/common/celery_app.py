"""The Celery app factory: Redis broker, late acks, prefetch 1, JSON only, time limits."""

from __future__ import annotations

from celery import Celery

from services.common.config import CommonSettings
from services.common.redis import celery_broker_url

# Every task ends within the hard limit, so a warm shutdown (SIGTERM: running tasks finish)
# ends within the worker's terminationGracePeriodSeconds (120 s, k8s/base/worker.yaml, checked
# by tests/k8s). The soft limit raises SoftTimeLimitExceeded in the task first; the hard one
# kills its process. Tasks are idempotent recomputations, and long ones stop on their own well
# before the soft limit and carry on in the next run.
TASK_SOFT_TIME_LIMIT_S = 90
TASK_TIME_LIMIT_S = 100


def make_celery(name: str, settings: CommonSettings) -> Celery:
    app = Celery(name, broker=celery_broker_url(settings.redis_url))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
        task_time_limit=TASK_TIME_LIMIT_S,
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
