"""The worker exports the gate drift gauge on its metrics port."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import requests
from celery import Celery

from services.common.redis import celery_broker_url
from tests.city import facts
from tests.stack import Stack, free_port, wait_for


def test_drift_gauge_is_served_by_the_worker(isolated: tuple[str, str], tmp_path: Path) -> None:
    database_url, redis_url = isolated
    with psycopg.connect(database_url, autocommit=True) as conn:
        op = facts.operator(conn)
        lot_id = facts.lot(conn, op, district="metrics", capacity={"standard": 50})
        t0 = datetime.now(UTC) - timedelta(minutes=2)
        facts.ingest(
            conn,
            op,
            [
                facts.count(lot_id, {"standard": 10}, t0),
                facts.gate(lot_id, "entry", t0 + timedelta(seconds=1)),
                facts.count(lot_id, {"standard": 14}, t0 + timedelta(seconds=5)),  # gates: 11
            ],
        )
    port = free_port()
    stack = Stack(
        database_url,
        redis_url,
        tmp_path / "stack",
        env_overrides={"PARKING_WORKER_METRICS_PORT": str(port)},
        names=("worker",),
    )
    try:
        stack.start("worker")
        Celery("tests", broker=celery_broker_url(redis_url)).send_task(
            "services.worker.tasks.reconcile", queue="parking"
        )
        line = f'parking_gate_drift{{lot_id="{lot_id}",space_type="standard"}} 3.0'

        def exported() -> bool:
            resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            return line in resp.text

        wait_for(exported, timeout=60, interval=0.2, what="the drift gauge")
        assert '"message": "gate count drift"' in stack.log("worker")
    finally:
        stack.stop()
