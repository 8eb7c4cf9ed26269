"""The beat entries of the city brain's periodic tasks (rollups, reconciliation, webhooks,
retention), merged into the worker app's beat schedule."""

from __future__ import annotations

from typing import Any

from services.common.config import WorkerSettings


def _every(task: str, seconds: float) -> dict[str, Any]:
    # A tick older than its period is dropped, so a busy worker does not work through a backlog
    # of identical recomputations.
    return {
        "task": f"services.worker.tasks.{task}",
        "schedule": seconds,
        "options": {"expires": max(1.0, seconds)},
    }


def city_schedule(settings: WorkerSettings) -> dict[str, dict[str, Any]]:
    return {
        "rollup-recent": _every("rollup_recent", settings.rollup_every_s),
        "reconcile-live-state": _every("reconcile", settings.reconcile_every_s),
        "webhooks-tick": _every("webhooks_tick", settings.webhook_scan_every_s),
        "prune-buckets": _every("prune_buckets", 3600.0),
    }
