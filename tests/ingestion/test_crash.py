"""Invariant 2 (ARCHITECTURE.md): an acknowledged event is never lost.

Clients push batches through the gateway while the ingestion workers are killed with SIGKILL
in the middle of the load; a client retries a batch that got no answer, as IoT hubs do. Every
acknowledged event must then be in PostgreSQL, and every lot's count must still be what the
logged events imply (invariant 1).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import requests

from tests.ingestion.helpers import create_lot, gate_lot_body, occupancy, space_lot_body, truth
from tests.stack import Client, Stack, wait_for

KILLS = 3


def test_acknowledged_events_survive_sigkill_of_ingestion_workers(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    operator_id, operator = new_operator()
    lots = [create_lot(operator, space_lot_body(20)) for _ in range(3)]
    lots += [create_lot(operator, gate_lot_body({"standard": 50, "ev": 5})) for _ in range(2)]
    key = operator.session.headers["Authorization"][7:]
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    problems: list[str] = []
    interrupted: list[int] = []  # batches that got no answer or a 5xx, and were sent again

    def make_batch(rng: random.Random, name: str, seq: int) -> list[dict[str, Any]]:
        batch = []
        for i in range(200):
            lot = rng.choice(lots)
            event: dict[str, Any] = {
                "id": f"{name}-{seq}-{i}",
                "lot_id": lot["id"],
                "observed_at": datetime.now(UTC).isoformat(),
            }
            if "spaces" in lot:
                space = rng.choice(lot["spaces"])
                event |= {"type": "space", "space_id": space["id"], "occupied": rng.random() < 0.5}
            else:
                event |= {"type": rng.choice(["entry", "exit"]), "space_type": "standard"}
            batch.append(event)
        return batch

    def client(n: int) -> None:
        rng = random.Random(n)
        session = Client(stack.url, key)
        deadline = time.monotonic() + 90
        for seq in range(10_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            batch = make_batch(rng, f"k{n}", seq)
            for _attempt in range(50):  # retry the same batch until it is acknowledged
                if time.monotonic() > deadline:
                    return
                try:
                    resp = session.post("/v1/events", json={"events": batch}, timeout=15)
                except requests.RequestException:
                    interrupted.append(seq)
                    continue
                if resp.status_code == 200:
                    body = resp.json()
                    counted = body["accepted"] + body["duplicate"] + body["stale"]
                    if counted != len(batch) or body["rejected"]:
                        with lock:
                            problems.append(resp.text)
                    with lock:
                        acknowledged.update(e["id"] for e in batch)
                    break
                if resp.status_code in (502, 503, 504):
                    interrupted.append(seq)
                    continue
                if resp.status_code != 429:
                    with lock:
                        problems.append(f"{resp.status_code} {resp.text}")
                    return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            target = len(acknowledged) + 1000
            wait_for(lambda target=target: len(acknowledged) >= target, timeout=60, what="load")
            pids = stack.worker_pids("ingestion")
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda pids=pids: (
                    (now := stack.worker_pids("ingestion")) and not set(now) & set(pids)
                ),
                timeout=30,
                what="gunicorn to replace the killed workers",
            )
        target = len(acknowledged) + 1000
        wait_for(lambda: len(acknowledged) >= target, timeout=60, what="load after the kills")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not problems, problems[:3]
    assert interrupted, "no batch was cut short by a kill"

    stored = {
        r[0]
        for r in conn.execute(
            "SELECT event_id FROM events WHERE operator_id = %s", (operator_id,)
        ).fetchall()
    }
    claimed = {
        r[0]
        for r in conn.execute(
            "SELECT event_id FROM event_ids WHERE operator_id = %s", (operator_id,)
        ).fetchall()
    }
    assert len(acknowledged) >= 4000
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged events lost"
    assert stored == claimed  # the id and the event commit together, or neither does
    # every lot's count is what the committed log implies
    logged = [
        {
            "id": r[0],
            "lot_id": str(r[1]),
            "type": r[2],
            "space_id": r[3],
            "space_type": r[4],
            "occupied": r[5],
            "observed_at": r[6].isoformat(),
        }
        for r in conn.execute(
            "SELECT event_id, lot_id, type, space_id, space_type, occupied, observed_at"
            " FROM events WHERE operator_id = %s",
            (operator_id,),
        ).fetchall()
    ]
    for lot in lots:
        assert occupancy(conn, lot["id"]) == truth(lot, logged)
    stack.wait_ready("ingestion")
