"""``make bench-ingest``: event batches through the gateway, against COPY into PostgreSQL.

Starts its own stack (gateway and ingestion), registers lots, then in BENCH_ROUNDS (4) rounds
of BENCH_SECONDS / BENCH_ROUNDS each (20 s in all) BENCH_CLIENTS concurrent clients push batches
of BENCH_BATCH (500) events (space sensor events on space lots, entries and exits on gate lots)
over keep-alive connections; after each round, it copies as many events straight into the event
table with COPY, from as many connections, in batches of the same size. Push and COPY alternate
so that both meet the same machine (a shared one drifts within a minute): the median of the
rounds' ratios is the figure to compare across machines. It also prints p50/p99 latency per
batch and the resident memory of the ingestion workers after the first round and at the end.

Each client is an IoT hub serving its own share of the lots (BENCH_HUBS=1: every client sends
events of every lot).

Environment: BENCH_SECONDS, BENCH_ROUNDS, BENCH_WARMUP (3, before the first round),
BENCH_CLIENTS (8), BENCH_BATCH (500), BENCH_HUBS, BENCH_LOTS (100 space lots of 200 spaces, plus
a quarter as many gate lots), BENCH_INGESTION_WORKERS (3), BENCH_GATEWAY_WORKERS (1, the
Procfile's); BENCH_DATABASE_URL / BENCH_REDIS_URL to use real servers.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg

from loadtests.harness import bench_stack, report, summary
from loadtests.load import Connection
from tests.stack import Client, Stack

TARIFF = {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"}


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class Lots:
    spaces: list[tuple[str, list[str]]] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)

    def share(self, n: int, of: int) -> Lots:
        """The lots of hub ``n`` of ``of``: a hub serves its own sites, as IoT hubs do."""
        if of <= 1 or len(self.spaces) < of or len(self.gates) < of:
            return self
        return Lots(self.spaces[n::of], self.gates[n::of])

    def add(self, lot_id: str, space_ids: list[str]) -> None:
        """A lot just registered: one of space sensors if it has ``space_ids``, else of gates."""
        if space_ids:
            self.spaces.append((lot_id, space_ids))
        else:
            self.gates.append(lot_id)


def lot_bodies(
    n_space_lots: int, spaces_per_lot: int
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """The benchmark's lots as API bodies, each with its space ids: ``n_space_lots`` lots of
    ``spaces_per_lot`` sensors, then a quarter as many lots counted at their gates (no ids)."""
    for i in range(n_space_lots):
        ids = [f"S{j:04d}" for j in range(spaces_per_lot)]
        body = {
            "name": f"Bench space lot {i}",
            "location": {"lat": 30.13 + i * 1e-4, "lon": 120.08},
            "district": f"bench{i % 5}",
            "spaces": [
                {"id": s, "type": "ev" if j % 10 == 0 else "standard"} for j, s in enumerate(ids)
            ],
            "tariff": TARIFF,
        }
        yield body, ids
    for i in range(max(1, n_space_lots // 4)):
        body = {
            "name": f"Bench gate lot {i}",
            "location": {"lat": 30.25 + i * 1e-4, "lon": 120.13},
            "district": f"bench{i % 5}",
            "capacity": {"standard": 2000, "ev": 100},
            "tariff": TARIFF,
        }
        yield body, []


def register_lots(operator: Client, n_space_lots: int, spaces_per_lot: int) -> Lots:
    lots = Lots()
    for body, ids in lot_bodies(n_space_lots, spaces_per_lot):
        resp = operator.post("/v1/lots", json=body)
        assert resp.status_code == 201, resp.text
        lots.add(resp.json()["id"], ids)
    return lots


class EventSource:
    """Unique, realistic events: 80 % space sensors, 20 % gates; observed now."""

    def __init__(self, lots: Lots, name: str, seed: int) -> None:
        self.lots = lots
        self.name = name
        self.rng = random.Random(seed)
        self.seq = 0

    def batch(self, size: int) -> list[dict[str, Any]]:
        rng = self.rng
        first = datetime.now(UTC) - timedelta(microseconds=size)
        # one microsecond apart, formatted without a datetime per event (the load generator
        # shares the machine's two cores with the servers under test)
        prefix, micro = first.strftime("%Y-%m-%dT%H:%M:%S."), first.microsecond
        if micro + size >= 1_000_000:
            prefix, micro = (first + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S."), 0
        events: list[dict[str, Any]] = []
        for i in range(size):
            self.seq += 1
            observed_at = f"{prefix}{micro + i:06d}+00:00"
            event_id = f"{self.name}-{self.seq}"
            if rng.random() < 0.8:
                lot_id, spaces = rng.choice(self.lots.spaces)
                events.append(
                    {
                        "id": event_id,
                        "lot_id": lot_id,
                        "type": "space",
                        "space_id": rng.choice(spaces),
                        "occupied": rng.random() < 0.6,
                        "observed_at": observed_at,
                    }
                )
            else:
                event = {
                    "id": event_id,
                    "lot_id": rng.choice(self.lots.gates),
                    "type": "entry" if rng.random() < 0.52 else "exit",
                    "space_type": "standard",
                    "observed_at": observed_at,
                }
                if rng.random() < 0.3:
                    event["plate"] = f"浙A{rng.randint(10000, 99999)}"
                events.append(event)
        return events


@dataclass
class Totals:
    events: int = 0
    batches: int = 0
    errors: int = 0
    not_accepted: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, other: Totals) -> None:
        self.events += other.events
        self.batches += other.batches
        self.errors += other.errors
        self.not_accepted += other.not_accepted
        self.latencies += other.latencies


def push(
    stack: Stack, api_key: str, source: EventSource, batch: int, until: float, totals: Totals,
    measure_from: float,
) -> None:  # fmt: skip
    conn = Connection.to(stack.url)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    try:
        while time.monotonic() < until:
            body = orjson.dumps({"events": source.batch(batch)})
            started = time.monotonic()
            try:
                status, data = conn.request("POST", "/v1/events", body, headers)
            except (OSError, ValueError):
                with totals.lock:
                    totals.errors += 1
                continue
            elapsed = time.monotonic() - started
            if started < measure_from:
                continue
            with totals.lock:
                if status != 200:
                    totals.errors += 1
                    continue
                result = orjson.loads(data)
                totals.batches += 1
                totals.events += batch
                totals.not_accepted += batch - result["accepted"]
                totals.latencies.append(elapsed)
    finally:
        conn.close()


def copy_events(
    conn: psycopg.Connection[Any], operator_id: str, events: list[dict[str, Any]]
) -> None:
    """Copy ``events`` as they are into the event table, in one transaction: the baseline."""
    with (
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy(
            "COPY events (operator_id, event_id, lot_id, type, space_id, space_type,"
            " occupied, observed_at) FROM STDIN"
        ) as copy,
    ):
        for e in events:
            copy.write_row(
                (operator_id, e["id"], e["lot_id"], e["type"], e.get("space_id"),
                 e.get("space_type"), e.get("occupied"), e["observed_at"])
            )  # fmt: skip


def copy_baseline(
    database_url: str,
    operator_id: str,
    lots: Lots,
    n_events: int,
    clients: int,
    batch: int,
    hubs: int,
) -> tuple[float, int]:
    """Copy ``n_events`` like the pushed ones straight into ``events``; (events/s, copied)."""
    per_client = max(1, n_events // clients)
    sources = [
        EventSource(lots.share(c, hubs), f"copy{c}-{uuid.uuid4().hex[:6]}", 1000 + c)
        for c in range(clients)
    ]
    copied = [0] * clients
    ready = threading.Barrier(clients + 1)

    def run(c: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            ready.wait()
            done = 0
            while done < per_client:
                events = sources[c].batch(min(batch, per_client - done))
                copy_events(conn, operator_id, events)
                done += len(events)
            copied[c] = done

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return sum(copied) / elapsed, sum(copied)


def rss_kib(pids: list[int]) -> list[int]:
    sizes = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]))
        except OSError:
            continue
    return sizes


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def process_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each of ``pids`` still alive."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    return used


def stack_pids(stack: Stack) -> dict[str, list[int]]:
    """The processes whose CPU the benchmark reports: gateway, ingestion and PostgreSQL."""
    groups = {
        name: [stack.procs[name].pid, *stack.worker_pids(name)] for name in ("gateway", "ingestion")
    }
    dbname = str(psycopg.conninfo.conninfo_to_dict(stack.database_url)["dbname"])
    groups["postgresql"] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if cmdline.startswith(b"postgres:") and dbname.encode() in cmdline:
                groups["postgresql"].append(int(entry))
    return groups


def push_round(
    stack: Stack, api_key: str, sources: list[EventSource], batch: int, seconds: float,
    warmup: float,
) -> tuple[Totals, float, dict[str, float]]:  # fmt: skip
    """One push phase: (totals, measured seconds, CPU seconds per process group in it)."""
    totals = Totals()
    measure_from = time.monotonic() + warmup
    until = measure_from + seconds
    threads = [
        threading.Thread(
            target=push, args=(stack, api_key, source, batch, until, totals, measure_from)
        )
        for source in sources
    ]
    for t in threads:
        t.start()
    wait = measure_from - time.monotonic()
    if wait > 0:
        time.sleep(wait)  # the warm-up runs its own clock: nothing to poll
    cpu_start = cpu_seconds()
    groups = stack_pids(stack)
    group_start = {g: process_cpu(p) for g, p in groups.items()}
    for t in threads:
        t.join(seconds + warmup + 60)
    elapsed = max(1e-9, min(time.monotonic(), until + 30) - measure_from)
    cpu = {"bench_client": cpu_seconds() - cpu_start}
    for g, p in groups.items():
        cpu[g] = sum(v - group_start[g].get(pid, v) for pid, v in process_cpu(p).items())
    return totals, elapsed, cpu


def main() -> None:
    seconds = _env("BENCH_SECONDS", 20)
    rounds = max(1, int(_env("BENCH_ROUNDS", 4)))
    warmup = _env("BENCH_WARMUP", 3)
    clients = int(_env("BENCH_CLIENTS", 8))
    batch = int(_env("BENCH_BATCH", 500))
    n_lots = int(_env("BENCH_LOTS", 100))
    # 1: every client sends events of every lot; N: client c is a hub for 1/N of the lots
    hubs = int(_env("BENCH_HUBS", clients))
    env = {
        "INGESTION_WORKERS": os.environ.get("BENCH_INGESTION_WORKERS", "3"),
        "GATEWAY_WORKERS": os.environ.get("BENCH_GATEWAY_WORKERS", "1"),
        "PARKING_LOG_LEVEL": "WARNING",
    }
    with bench_stack(("gateway", "ingestion"), **env) as (stack, admin):
        resp = admin.post("/v1/admin/operators", json={"name": "Bench Co"})
        assert resp.status_code == 201, resp.text
        operator_id, api_key = resp.json()["id"], resp.json()["api_key"]
        lots = register_lots(Client(stack.url, api_key), n_lots, 200)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("ANALYZE")  # as autovacuum would have, in a database in service
        pids = stack.worker_pids("ingestion")
        sources = [EventSource(lots.share(c, hubs), f"c{c}", c) for c in range(clients)]

        # Push and COPY alternate, round by round, so that both see the same machine (a shared
        # one drifts over a minute); each round's COPY copies as many events as it pushed.
        totals = Totals()
        pushed_s = copied_s = 0.0
        copied = 0
        ratios: list[float] = []
        cpu: dict[str, float] = {}
        rss_start: list[int] = []
        for r in range(rounds):
            # the first round warms up the stack; the others only let the clients get going
            done, elapsed, used = push_round(
                stack, api_key, sources, batch, seconds / rounds, warmup if r == 0 else 0.5
            )
            if r == 0:
                rss_start = rss_kib(pids)
            for g, v in used.items():
                cpu[g] = cpu.get(g, 0.0) + v
            totals.add(done)
            pushed_s += elapsed
            copy_rate, n = copy_baseline(
                stack.database_url, operator_id, lots, done.events or batch, clients, batch, hubs
            )
            if copy_rate:
                copied += n
                copied_s += n / copy_rate  # as copy_baseline timed it: from the barrier on
                ratios.append(done.events / elapsed / copy_rate)
        rss_end = rss_kib(pids)
        rate = totals.events / max(1e-9, pushed_s)
        copy_rate = copied / max(1e-9, copied_s)
        with psycopg.connect(stack.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM event_ids WHERE operator_id = %s", (operator_id,)
            ).fetchone()
        logged = int(row[0]) if row else 0

    lat = summary(totals.latencies)
    report(
        "bench-ingest: POST /v1/events through the gateway vs COPY",
        {
            "duration_s": round(pushed_s, 1),
            "rounds": rounds,
            "clients": clients,
            "hubs": hubs,
            "batch": batch,
            "batches": totals.batches,
            "errors": totals.errors,
            "not_accepted": totals.not_accepted,
            "events_per_s": round(rate),
            "batch_p50_ms": lat["p50_ms"],
            "batch_p99_ms": lat["p99_ms"],
            "copy_events_per_s": round(copy_rate),
            "copy_events": copied,
            # the median of the rounds' ratios: each round's push against its own COPY
            "ratio_to_copy": round(statistics.median(ratios), 3) if ratios else float("nan"),
            "ratio_per_round": [round(x, 3) for x in ratios],
            "event_ids_in_postgresql": logged,
            "cpu_s": {g: round(v, 1) for g, v in cpu.items()},
            # a machine-independent view: what the whole path costs per 1000 events
            "cpu_ms_per_1000_events": round(sum(cpu.values()) * 1e6 / max(1, totals.events), 1),
            "ingestion_workers": len(pids),
            "ingestion_rss_start_mib": [round(k / 1024, 1) for k in rss_start],
            "ingestion_rss_end_mib": [round(k / 1024, 1) for k in rss_end],
        },
    )


if __name__ == "__main__":
    main()
