"""The worker's main process serves the gate drift gauge, whichever pool process ran the pass."""

from __future__ import annotations

import os
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import requests
from celery import Celery

from services.common.redis import celery_broker_url
from tests.city import facts
from tests.stack import Stack, free_port, wait_for


def _drift(base: str, lot_id: str) -> float | None:
    text = requests.get(f"{base}/metrics", timeout=2).text
    m = re.search(
        rf'^parking_gate_drift\{{lot_id="{lot_id}",space_type="standard"\}} (\S+)$', text, re.M
    )
    return float(m.group(1)) if m else None


def _holders(metrics_dir: Path, lot_id: str) -> set[int]:
    """The processes whose sample files hold a value for the lot (``<kind>_<pid>.db``)."""
    return {
        int(path.stem.rsplit("_", 1)[1])
        for path in metrics_dir.rglob("*.db")
        if lot_id.encode() in path.read_bytes()
    }


def test_drift_gauge_is_served_whichever_child_ran_the_task(
    isolated: tuple[str, str], tmp_path: Path
) -> None:
    database_url, redis_url = isolated
    t0 = datetime.now(UTC) - timedelta(minutes=2)
    with psycopg.connect(database_url, autocommit=True) as conn:
        op = facts.operator(conn)
        lot_id = facts.lot(conn, op, district="metrics", capacity={"standard": 50})
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
    base = f"http://127.0.0.1:{port}"
    stack = Stack(
        database_url,
        redis_url,
        tmp_path / "stack",
        env_overrides={"PARKING_WORKER_METRICS_PORT": str(port), "WORKER_CONCURRENCY": "2"},
        names=("worker",),
    )
    sender = Celery("tests", broker=celery_broker_url(redis_url))
    try:
        stack.start("worker")
        wait_for(
            lambda: requests.get(f"{base}/readyz", timeout=2).status_code == 200,
            timeout=60,
            interval=0.2,
            what="the worker's /readyz",
        )
        children = set(stack.worker_pids("worker"))
        assert len(children) == 2

        sender.send_task("services.worker.tasks.reconcile", queue="parking")
        wait_for(lambda: _drift(base, lot_id) == 3.0, timeout=60, interval=0.2, what="drift 3")
        assert '"message": "gate count drift"' in stack.log("worker")
        (first,) = _holders(tmp_path / "stack" / "metrics", lot_id)
        assert first in children, "a pool process ran the pass, and the main process serves it"

        # The process that ran it goes (the pool starts another): the value it set stays served
        # until a newer pass, which another process runs.
        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: len(set(stack.worker_pids("worker")) - {first}) == 2,
            timeout=30,
            interval=0.2,
            what="the pool to replace its process",
        )
        assert _drift(base, lot_id) == 3.0
        with psycopg.connect(database_url, autocommit=True) as conn:
            facts.ingest(
                conn, op, [facts.count(lot_id, {"standard": 15}, t0 + timedelta(seconds=9))]
            )
        sender.send_task("services.worker.tasks.reconcile", queue="parking")
        wait_for(lambda: _drift(base, lot_id) == 1.0, timeout=60, interval=0.2, what="drift 1")
        others = _holders(tmp_path / "stack" / "metrics", lot_id) - {first}
        assert others and others <= set(stack.worker_pids("worker"))
    finally:
        stack.stop()
