"""``make bench-reservations``: concurrent drivers reserving through the gateway.

Starts its own stack (gateway and reservations), registers lots (a few contended ones with a
quota of 10, the rest with room to spare), mints drivers, then for BENCH_SECONDS (default 20)
BENCH_CLIENTS concurrent clients POST /v1/reservations over keep-alive connections, each with a
fresh Idempotency-Key; BENCH_CONTENDED (0.3) of the requests go to the contended lots, where
windows collide and many answers are 409 no-capacity. It prints reservations made per second
(201 answers), requests per second, p50/p99 latency, the answers by status, the CPU each process
group spent per request (gateway and reservations workers, PostgreSQL's postmaster and backends,
Redis, the load generator, and the whole machine, which includes anything else running), and the
number of overbookings found afterwards by SQL (instants where confirmed reservations of a lot
and type exceed its quota; must be 0).

The clients are threads of this process on lean keep-alive connections (``load.Connection``):
``http.client`` parses every answer's headers with the ``email`` package, which cost more CPU per
request than some of the servers under test.

In the same run it measures a baseline: authenticated GET /v1/reservations?limit=1 (the same
gateway, token check, proxy and one indexed query) for BENCH_BASELINE_SECONDS (5) at the same
concurrency; the ratio of the two rates is the figure to compare across machines.

Environment: BENCH_SECONDS, BENCH_WARMUP (2), BENCH_BASELINE_SECONDS, BENCH_CLIENTS (32),
BENCH_LOTS (50), BENCH_CONTENDED_LOTS (5), BENCH_CONTENDED, BENCH_DRIVERS (500),
BENCH_RESERVATIONS_WORKERS (2) and BENCH_RESERVATIONS_THREADS (4) of the Procfile's gthread
workers, BENCH_GATEWAY_WORKERS (2), BENCH_DB_POOL_MAX (4 per process);
BENCH_DATABASE_URL / BENCH_REDIS_URL to use real servers.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import redis

from loadtests.harness import bench_stack, report, summary
from loadtests.load import Connection
from services.common.lots import LotIn
from services.ingestion.registry import create_lot
from tests.reservations.helpers import mint_tokens
from tests.stack import Client, Stack

TARIFF = {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"}
CONTENDED_QUOTA = 10
TARGET_PER_S = 500


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def register_lots(
    conn: psycopg.Connection[Any], operator_id: str, n: int, contended: int
) -> tuple[list[str], list[str]]:
    """(contended lot ids, roomy lot ids)."""
    out: tuple[list[str], list[str]] = ([], [])
    for i in range(n):
        tight = i < contended
        lot = LotIn.model_validate(
            {
                "name": f"Bench lot {i}",
                "location": {"lat": 30.13 + i * 1e-4, "lon": 120.08},
                "district": f"bench{i % 5}",
                "capacity": {"standard": 100_000 if not tight else 200},
                "reservable": {"standard": CONTENDED_QUOTA if tight else 100_000},
                "tariff": TARIFF,
            }
        )
        lot_id = str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])
        out[0 if tight else 1].append(lot_id)
    return out


class Load:
    """Clients sending requests made by ``make`` until ``stop_at``; latencies and statuses."""

    def __init__(
        self,
        base: str,
        make: Callable[[random.Random], tuple[str, str, bytes | None, dict[str, str]]],
    ) -> None:
        self.base = base
        self.make = make
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0

    def run(self, clients: int, seconds: float, warmup: float) -> float:
        """Run for ``warmup + seconds``; count only the last ``seconds``; return that span."""
        start = time.monotonic()
        measure_from = start + warmup
        stop_at = measure_from + seconds
        threads = [
            threading.Thread(target=self._client, args=(i, measure_from, stop_at), daemon=True)
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + warmup + 30)
        return seconds

    def _client(self, seed: int, measure_from: float, stop_at: float) -> None:
        rng = random.Random(seed)
        conn = Connection.to(self.base)  # lean: http.client's header parsing costs much CPU
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        errors = 0
        while (now := time.monotonic()) < stop_at:
            method, path, body, headers = self.make(rng)
            try:
                status, _ = conn.request(method, path, body, headers)
            except (OSError, ValueError):
                errors += 1  # the connection is closed; the next request opens a new one
                continue
            done = time.monotonic()
            if now >= measure_from:
                latencies.append(done - now)
                statuses[status] += 1
        conn.close()
        with self.lock:
            self.latencies += latencies
            self.statuses.update(statuses)
            self.errors += errors


def cpu_seconds(pids: list[int], *, reaped: bool = False) -> float:
    """User + system CPU seconds used so far by ``pids`` (Linux /proc); with ``reaped``, also
    by their children that exited (PostgreSQL's postmaster reaps its backends)."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if reaped:
            total += int(fields[13]) + int(fields[14])
    return total / tick


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]


def server_pids(stack: Stack) -> dict[str, list[int]]:
    """The local PostgreSQL postmaster and Redis server, when they run on this machine (for
    their CPU per request); empty lists when they are elsewhere."""
    out: dict[str, list[int]] = {"postgresql": [], "redis": []}
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    postmaster = _parent(int(row[0])) if row else None
    if postmaster:
        out["postgresql"] = [postmaster]
    info = redis.Redis.from_url(stack.redis_url).info("server")
    if os.path.exists(f"/proc/{info.get('process_id')}"):
        out["redis"] = [int(info["process_id"])]
    return out


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / os.sysconf("SC_CLK_TCK")


def overbookings(conn: psycopg.Connection[Any]) -> int:
    """(lot, type, instant) triples where confirmed reservations exceed the lot's quota."""
    row = conn.execute(
        "SELECT count(*) FROM ("
        " SELECT r.lot_id, r.space_type, r.starts_at,"
        "  (SELECT count(*) FROM reservations o WHERE o.lot_id = r.lot_id"
        "    AND o.space_type = r.space_type AND o.status = 'confirmed'"
        "    AND o.starts_at <= r.starts_at AND o.ends_at > r.starts_at) AS n"
        " FROM reservations r WHERE r.status = 'confirmed'"
        " GROUP BY r.lot_id, r.space_type, r.starts_at) x"
        " JOIN lots l ON l.id = x.lot_id"
        " WHERE x.n > coalesce((l.reservable ->> x.space_type)::int, 0)"
    ).fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    seconds = _env("BENCH_SECONDS", 20)
    warmup = _env("BENCH_WARMUP", 2)
    baseline_s = _env("BENCH_BASELINE_SECONDS", 5)
    clients = int(_env("BENCH_CLIENTS", 32))
    n_lots = int(_env("BENCH_LOTS", 50))
    n_contended = int(_env("BENCH_CONTENDED_LOTS", 5))
    contended_share = _env("BENCH_CONTENDED", 0.3)
    n_drivers = int(_env("BENCH_DRIVERS", 500))
    env = {
        "RESERVATIONS_WORKERS": os.environ.get("BENCH_RESERVATIONS_WORKERS", "2"),
        "RESERVATIONS_THREADS": os.environ.get("BENCH_RESERVATIONS_THREADS", "4"),
        "GATEWAY_WORKERS": os.environ.get("BENCH_GATEWAY_WORKERS", "2"),
        "PARKING_DB_POOL_MAX": os.environ.get("BENCH_DB_POOL_MAX", "4"),
        # every driver reserves over and over: the anti-hoarding cap is not what is measured
        "PARKING_RESERVATIONS_MAX_OPEN_PER_DRIVER": "1000000",
        "PARKING_LOG_LEVEL": "WARNING",
    }
    with bench_stack(("gateway", "reservations"), **env) as (stack, admin):
        run(stack, admin, seconds, warmup, baseline_s, clients, n_lots, n_contended,
            contended_share, n_drivers)  # fmt: skip


def run(
    stack: Stack,
    admin: Client,
    seconds: float,
    warmup: float,
    baseline_s: float,
    clients: int,
    n_lots: int,
    n_contended: int,
    contended_share: float,
    n_drivers: int,
) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        operator_id = str(uuid.uuid4())
        conn.execute("INSERT INTO operators (id, name) VALUES (%s, 'bench')", (operator_id,))
        contended, roomy = register_lots(conn, operator_id, n_lots, n_contended)
        tokens = [t for _, t in mint_tokens(stack, conn, n_drivers)]
    del admin
    base_day = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )

    def reservation(rng: random.Random) -> tuple[str, str, bytes | None, dict[str, str]]:
        if contended and rng.random() < contended_share:
            lot = rng.choice(contended)
            # windows collide within one day: quarter-hour starts, up to 3 hours long
            start = base_day + timedelta(minutes=15 * rng.randrange(0, 96))
            end = start + timedelta(minutes=15 * rng.randrange(1, 13))
        else:
            lot = rng.choice(roomy)
            start = base_day + timedelta(minutes=rng.randrange(0, 30 * 24 * 60))
            end = start + timedelta(minutes=rng.randrange(15, 240))
        body = orjson.dumps(
            {
                "lot_id": lot,
                "space_type": "standard",
                "start": start.isoformat(),
                "end": end.isoformat(),
                "plate": f"浙A{rng.randrange(100000):05d}",
            }
        )
        headers = {
            "Authorization": f"Bearer {rng.choice(tokens)}",
            "Content-Type": "application/json",
            "Idempotency-Key": uuid.uuid4().hex,
        }
        return "POST", "/v1/reservations", body, headers

    def baseline(rng: random.Random) -> tuple[str, str, bytes | None, dict[str, str]]:
        return (
            "GET",
            "/v1/reservations?limit=1",
            None,
            {"Authorization": f"Bearer {rng.choice(tokens)}"},
        )

    groups = {name: stack.worker_pids(name) for name in ("gateway", "reservations")}
    groups.update(server_pids(stack))

    def cpu_now() -> dict[str, float]:
        used = {name: cpu_seconds(pids) for name, pids in groups.items() if name != "postgresql"}
        # PostgreSQL: the postmaster, the backends it reaped and those alive now
        used["postgresql"] = sum(
            cpu_seconds([pm], reaped=True) + cpu_seconds(children(pm))
            for pm in groups["postgresql"]
        )
        used["load generator"] = time.process_time()
        used["whole machine"] = machine_cpu_seconds()
        return used

    def per_request(before: dict[str, float], requests: int) -> dict[str, float]:
        after = cpu_now()
        return {
            name: round((after[name] - before[name]) / max(1, requests) * 1000, 3) for name in after
        }

    base = Load(stack.url, baseline)
    before = cpu_now()
    base.run(clients, baseline_s, 0)
    base_rps = sum(base.statuses.values()) / baseline_s
    base_ms = per_request(before, sum(base.statuses.values()))

    load = Load(stack.url, reservation)
    before = cpu_now()
    load.run(clients, seconds + warmup, 0)
    seconds += warmup  # measured from the start, so CPU and requests cover the same span
    made = load.statuses.get(201, 0)
    requests_total = sum(load.statuses.values())
    per_request_ms = per_request(before, requests_total)
    machine = per_request_ms["whole machine"] * requests_total / 1000

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        found = overbookings(conn)
        row = conn.execute(
            "SELECT count(*) FROM reservations WHERE status = 'confirmed'"
        ).fetchone()
    stats = summary(load.latencies)
    per_s = made / seconds
    report(
        "bench-reservations: POST /v1/reservations through the gateway",
        {
            "reservations_per_s": round(per_s, 1),
            "requests_per_s": round(requests_total / seconds, 1),
            "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"],
            "answers": dict(sorted(load.statuses.items())),
            "transport_errors": load.errors,
            "cpu_ms_per_request": per_request_ms,
            "machine_busy_cores": round(machine / seconds, 2),
            "confirmed_in_db": row[0] if row else None,
            "overbookings": found,
            "baseline_get_per_s": round(base_rps, 1),
            "baseline_cpu_ms_per_request": base_ms,
            "ratio_to_baseline": round(requests_total / seconds / base_rps, 3)
            if base_rps
            else None,
            "target_reservations_per_s": TARGET_PER_S,
            "clients": clients,
            "seconds": seconds,
        },
    )
    if found:
        raise SystemExit(f"{found} overbooking(s) found")


if __name__ == "__main__":
    main()
