"""The Celery app of the worker and the beat: ``celery -A services.worker.app worker``."""

from __future__ import annotations

from celery.signals import beat_init, setup_logging, worker_process_init

from services.common import logs
from services.common.celery_app import make_celery
from services.common.config import WorkerSettings, cached
from services.common.db import Database
from services.worker.schedule import city_schedule

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


@setup_logging.connect
def _logging(**_: object) -> None:
    logs.configure("worker", settings.log_level)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    db.close()


@beat_init.connect
def _run_maintenance_at_start(**_: object) -> None:
    """Partitions must exist before events arrive: do not wait an interval after a start."""
    app.send_task("services.worker.tasks.maintain_partitions")
