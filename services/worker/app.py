"""The Celery app of the worker and the beat: ``celery -A services.worker.app worker``."""

from __future__ import annotations

from services.worker import serving

# First, before the imports below load prometheus_client: it picks where samples go when it is
# first imported, and every process of the worker must write them where the main one reads.
serving.prepare_metrics_dir()

from celery.signals import (  # noqa: E402
    beat_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from services.common import logs  # noqa: E402
from services.common.celery_app import make_celery  # noqa: E402
from services.common.config import WorkerSettings, cached  # noqa: E402
from services.common.db import Database  # noqa: E402
from services.common.redis import RedisClient  # noqa: E402
from services.worker.schedule import city_schedule  # noqa: E402

settings = cached(WorkerSettings)
app = make_celery("parking", settings)
app.conf.beat_schedule = {
    "maintain-event-partitions": {
        "task": "services.worker.tasks.maintain_partitions",
        "schedule": 3600.0,
    },
    "mark-reservation-no-shows": {
        "task": "services.worker.reservation_tasks.mark_no_shows",
        "schedule": 60.0,
    },
    "clean-idempotency-keys": {
        "task": "services.worker.reservation_tasks.clean_idempotency_keys",
        "schedule": 3600.0,
    },
}
app.conf.beat_schedule.update(city_schedule(settings))
app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout_s}
app.conf.include = ["services.worker.tasks", "services.worker.reservation_tasks"]
db = Database(settings, "worker")
# the broker's Redis, asked by /readyz (of the main process: the tasks have clients of their own)
broker = RedisClient(settings)


@setup_logging.connect
def _logging(**_: object) -> None:
    logs.configure("worker", settings.log_level)


@worker_ready.connect
def _serve_worker(**_: object) -> None:
    """Once the pool's processes run and the worker consumes: ready while both servers answer."""
    serving.serve(settings, {"postgresql": db.ping, "broker": broker.ping})


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    db.close()
    serving.after_fork()


@worker_process_shutdown.connect
def _process_exits(**_: object) -> None:
    serving.process_exited()


@beat_init.connect
def _serve_beat(**_: object) -> None:
    """Before the maintenance below, which may wait for the broker: beat only sends to it."""
    serving.serve(settings, {"broker": broker.ping})


@beat_init.connect
def _run_maintenance_at_start(**_: object) -> None:
    """Partitions must exist before events arrive: do not wait an interval after a start."""
    app.send_task("services.worker.tasks.maintain_partitions")
