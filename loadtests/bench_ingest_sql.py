"""``make bench-ingest-sql``: PostgreSQL's own CPU for an event batch, ingestion against COPY.

bench-ingest's ratio is the whole path's: the gateway, the ingestion workers, Redis, the load
generator and PostgreSQL share two cores. This one isolates PostgreSQL's part. One connection
applies batches of BENCH_BATCH (500) of bench-ingest's events with the service's own
``intake.ingest`` (validated as the service validates them, plates hashed), then copies as many
such events into the event table with COPY, alternating, in BENCH_ROUNDS (4) rounds of
BENCH_BATCHES (200) batches each, after a round of each to warm up. It reads the server
process' CPU time from /proc, so the server must run on this machine (the embedded one, or
BENCH_DATABASE_URL on 127.0.0.1), and prints per batch the server's and the client's CPU and the
wall time, the write-ahead log written per event, and the ratio of COPY's server CPU per event to
the intake's: on a quiet machine its rounds agree within a few per cent, where bench-ingest's
spread by ten or more, so a change to the SQL shows in it (on a busy one both spread further:
compare several runs).

Environment: BENCH_ROUNDS, BENCH_BATCHES, BENCH_BATCH, BENCH_LOTS (100 space lots of 200
spaces, plus a quarter as many gate lots), BENCH_DATABASE_URL.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg

from loadtests.bench_ingest import EventSource, Lots, copy_events, lot_bodies, process_cpu
from loadtests.harness import bench_database, report
from services.common.lots import LotIn
from services.common.principals import create_operator
from services.ingestion import intake, registry
from services.ingestion.schemas import validate_batch_json

PLATE_KEY = "bench-plate-key-" * 2
HUBS = 8  # bench-ingest's clients: each batch brings the events of one hub's lots


@dataclass
class Phase:
    server_s: float = 0.0
    client_s: float = 0.0
    wall_s: float = 0.0
    wal_bytes: int = 0
    batches: int = 0

    def add(self, other: Phase) -> None:
        self.server_s += other.server_s
        self.client_s += other.client_s
        self.wall_s += other.wall_s
        self.wal_bytes += other.wal_bytes
        self.batches += other.batches

    def per_batch_ms(self, total: float) -> float:
        return round(total / max(1, self.batches) * 1e3, 2)


Batch = list[dict[str, Any]]


def measured(
    conn: psycopg.Connection[Any],
    apply: Callable[[Batch], None],
    batches: list[Batch],
    monitor: psycopg.Connection[Any],
) -> Phase:
    """Apply each of ``batches`` on ``conn``; the CPU its server process and this one spent,
    and the write-ahead log the server wrote meanwhile (read on ``monitor``, in autocommit)."""
    pid = int(conn.info.backend_pid)
    wal = _wal_position(monitor)
    server = process_cpu([pid])[pid]
    client = time.process_time()
    started = time.perf_counter()
    for batch in batches:
        apply(batch)
    return Phase(
        server_s=process_cpu([pid])[pid] - server,
        client_s=time.process_time() - client,
        wall_s=time.perf_counter() - started,
        wal_bytes=_wal_position(monitor) - wal,
        batches=len(batches),
    )


def _wal_position(monitor: psycopg.Connection[Any]) -> int:
    row = monitor.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def validated(body: bytes, size: int) -> Batch:
    events = validate_batch_json(body, size)
    assert events is not None, "bench-ingest's events are valid"
    return events


def register(conn: psycopg.Connection[Any], operator_id: str, n_space_lots: int) -> Lots:
    lots = Lots()
    for body, ids in lot_bodies(n_space_lots, 200):
        lot = registry.create_lot(conn, operator_id=operator_id, lot=LotIn.model_validate(body))
        lots.add(str(lot["id"]), ids)
    conn.execute("ANALYZE")  # as autovacuum would have, in a database in service
    return lots


def run(database_url: str) -> dict[str, Any]:
    rounds = int(os.environ.get("BENCH_ROUNDS", 4))
    n_batches = int(os.environ.get("BENCH_BATCHES", 200))
    size = int(os.environ.get("BENCH_BATCH", 500))
    with psycopg.connect(database_url, autocommit=True) as conn:
        operator_id = create_operator(conn, name="Bench Co")["id"]
        lots = register(conn, operator_id, int(os.environ.get("BENCH_LOTS", 100)))
    pushed, copied = Phase(), Phase()
    ratios: list[float] = []
    with (
        psycopg.connect(database_url) as conn,
        psycopg.connect(database_url) as copy_conn,
        psycopg.connect(database_url, autocommit=True) as monitor,
    ):
        horizon = datetime.now(UTC) + timedelta(days=1)

        def ingest(events: Batch) -> None:
            outcome = intake.Outcome()
            intake.ingest(
                conn, operator_id=operator_id, events=events, index=None, plate_key=PLATE_KEY,
                horizon=horizon, future="in the future", outcome=outcome,
            )  # fmt: skip
            assert outcome.accepted == len(events), outcome.body()

        for r in range(rounds + 1):  # the first round warms up both connections
            hub = r % HUBS
            source = EventSource(lots.share(hub, HUBS), f"r{r}", r)
            batches = [
                validated(orjson.dumps({"events": source.batch(size)}), size)
                for _ in range(n_batches)
            ]
            push = measured(conn, ingest, batches, monitor)
            source = EventSource(lots.share(hub, HUBS), f"copy{r}", r)
            plain = [source.batch(size) for _ in range(n_batches)]
            copy = measured(
                copy_conn,
                lambda events: copy_events(copy_conn, operator_id, events),
                plain,
                monitor,
            )
            if r == 0:
                continue
            pushed.add(push)
            copied.add(copy)
            ratios.append(copy.server_s / max(1e-9, push.server_s))
    return {
        "rounds": rounds,
        "batches_per_round": n_batches,
        "batch": size,
        "ingest_server_cpu_ms_per_batch": pushed.per_batch_ms(pushed.server_s),
        "ingest_client_cpu_ms_per_batch": pushed.per_batch_ms(pushed.client_s),
        "ingest_wall_ms_per_batch": pushed.per_batch_ms(pushed.wall_s),
        "copy_server_cpu_ms_per_batch": copied.per_batch_ms(copied.server_s),
        "copy_client_cpu_ms_per_batch": copied.per_batch_ms(copied.client_s),
        "copy_wall_ms_per_batch": copied.per_batch_ms(copied.wall_s),
        "ingest_server_cpu_us_per_event": round(
            pushed.server_s / max(1, pushed.batches * size) * 1e6, 2
        ),
        "ingest_wal_bytes_per_event": round(pushed.wal_bytes / max(1, pushed.batches * size)),
        "copy_wal_bytes_per_event": round(copied.wal_bytes / max(1, copied.batches * size)),
        # the median of the rounds' ratios: each round's intake against its own COPY
        "server_cpu_ratio_copy_to_ingest": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
    }


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="parking-bench-") as tmp,
        bench_database(Path(tmp)) as database_url,
    ):
        figures = run(database_url)
    report("bench-ingest-sql: PostgreSQL's CPU for ingest_events vs COPY, one connection", figures)


if __name__ == "__main__":
    main()
