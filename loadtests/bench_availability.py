"""Availability lookups through the gateway: ``make bench-availability``.

With BENCH_LOTS lots loaded (COPY into PostgreSQL, then a Redis refill), in one run:

1. throughput at saturation (BENCH_CONCURRENCY closed-loop clients, BENCH_SECONDS each) of
   - the floor: ``GET /v1/lots/_ping``, a constant answer of the availability service behind the
     same gateway, gunicorn workers and WSGI layer as lot detail (services.availability.fastpath),
   - lot detail ``GET /v1/lots/{id}`` of random lots,
   - nearby search ``GET /v1/lots?lat&lon`` (1 km, 20 results) at random points among the lots,
   printing requests/s, p50/p99 and the ratio to the floor;
2. latency at a fixed rate (BENCH_RATE requests/s, open loop, timed from each request's
   scheduled start) for detail and search, in BENCH_ROUNDS rounds: each round's p99 is printed,
   and the round of median p99 is the figure (and the one the 100,000-lot ratio compares);
3. BENCH_STREAM_CLIENTS idle server-sent-event clients through the gateway: the memory they
   cost (RSS of the gateway and availability processes) and the fixed-rate latency with them
   connected;
4. with BENCH_LARGE_LOTS lots (0 skips it): the fixed-rate latency again, and its ratio to 1,
   after a warm-up that reads every lot once (their details, in a shuffled order) and then
   searches for BENCH_LARGE_WARM_SECONDS: at 10,000 lots the fixed-rate rounds come after the
   saturation rounds, which read every lot many times, so both compare the read path with its
   lot cache warm, as a running service has it; and the availability workers' memory with
   every lot cached. (A warm-up timed in seconds alone read two thirds of the lots on a slow
   machine, and the rounds then measured the cache filling: a lot read the first time costs
   the worker its parse and its view.)

Targets on the 2-core machine: lot detail 2,500 requests/s and a ratio of 0.8 to the floor;
p99 under 50 ms at 1,000 requests/s, within 1.5x at 100,000 lots; 1,000 idle stream clients
under 200 MB without slowing the other endpoints.
"""

from __future__ import annotations

import math
import os
import random
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import redis

from loadtests import load
from loadtests.harness import bench_stack, report, summary
from services.availability.readpath import refill
from services.common.redis import connect
from tests.stack import Stack

CENTER = (30.25, 120.15)  # Hangzhou
SPAN_M = 30_000.0  # lots spread over a 30 km square
TYPES = ("standard", "ev", "accessible")
TARIFF = '{"currency": "CNY", "per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"}'


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def random_point(rng: random.Random) -> tuple[float, float]:
    lat = CENTER[0] + rng.uniform(-0.5, 0.5) * SPAN_M / 111_195.0
    lon = CENTER[1] + rng.uniform(-0.5, 0.5) * SPAN_M / (
        111_195.0 * math.cos(math.radians(CENTER[0]))
    )
    return lat, lon


def load_lots(conn: psycopg.Connection, operator_id: str, count: int, seed: int) -> list[str]:
    """COPY ``count`` gate-counted lots with live counts; return their ids."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]
    now = datetime.now(UTC)
    occupancy: list[tuple[str, list[tuple[str, int, int]]]] = []
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY lots (id, operator_id, name, district, lat, lon, counting, capacity, tariff)"
            " FROM STDIN"
        ) as copy:
            for n, lot_id in enumerate(ids):
                lat, lon = random_point(rng)
                capacity = {"standard": rng.randint(20, 400), "ev": rng.randint(0, 20)}
                if n % 5 == 0:
                    capacity["accessible"] = rng.randint(1, 6)
                copy.write_row(
                    (
                        lot_id,
                        operator_id,
                        f"Bench P{seed}-{n}",
                        f"d{n % 12}",
                        lat,
                        lon,
                        "gates",
                        psycopg.types.json.Jsonb(capacity),
                        TARIFF,
                    )
                )
                rows = [(t, c, rng.randint(0, c)) for t, c in capacity.items()]
                occupancy.append((lot_id, rows))
        with cur.copy(
            "COPY lot_occupancy (lot_id, space_type, capacity, occupied, snapshot_occupied)"
            " FROM STDIN"
        ) as copy:
            for lot_id, rows in occupancy:
                for space_type, cap, occ in rows:
                    copy.write_row((lot_id, space_type, cap, occ, occ))
        with cur.copy("COPY lot_live (lot_id, version, updated_at) FROM STDIN") as copy:
            for lot_id in ids:
                copy.write_row((lot_id, 1, now))
    # vacuumed and analysed now, so autovacuum does not pick the new rows up while we measure
    for table in ("lots", "lot_occupancy", "lot_live"):
        conn.execute(f"VACUUM (ANALYZE) {table}")
    return ids


def every_lot(base: str, ids: list[str], *, concurrency: int, seconds: float = 300) -> int:
    """Read each lot's detail once, in a shuffled order, from ``concurrency`` clients of one
    process (which share the list); return how many lots were read."""
    order = list(ids)
    random.Random(11).shuffle(order)
    left = iter(order)
    lock = threading.Lock()

    def next_lot(_: int) -> load.Request:
        with lock:
            lot_id = next(left, None)
        return ("GET", f"/v1/lots/{lot_id or order[0]}", None, {})

    per_client = -(-len(order) // concurrency)
    r = load.run(
        base,
        next_lot,
        concurrency=concurrency,
        seconds=seconds,
        processes=1,
        max_requests_per_client=per_client,
    )
    assert r.statuses.get(200) == r.requests and not r.errors, r.statuses
    return min(r.requests, len(order))


def fixed_rate(
    base: str, make: Callable[[int], load.Request], *, rate: float, seconds: float
) -> list[float]:
    """Open-loop load at ``rate`` requests/s; latencies timed from each scheduled start."""
    threads = max(4, min(64, int(rate / 25)))
    interval = threads / rate
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    started = time.perf_counter() + 0.1

    def client(k: int) -> None:
        conn = load.Connection.to(base)
        mine: list[float] = []
        due = started + k * interval / threads
        end = started + seconds
        i = k
        for _ in range(10_000_000):
            if due >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            method, path, body, headers = make(i)
            try:
                status, _ = conn.request(method, path, body, headers)
                if status != 200:
                    errors[0] += 1
            except (OSError, ValueError):
                errors[0] += 1
            mine.append(time.perf_counter() - due)
            due += interval
            i += threads
        conn.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    assert not errors[0], f"{errors[0]} failed requests"
    return latencies


def at_rate_rounds(
    base: str, make: Callable[[int], load.Request], *, rate: float, seconds: float, rounds: int
) -> tuple[dict[str, float], str]:
    """``fixed_rate`` in ``rounds`` rounds of ``seconds / rounds``: the round of median p99
    (a pause of the shared machine lands in one round, not in every figure) and every round's
    p99, printed beside it."""
    runs = [
        summary(fixed_rate(base, make, rate=rate, seconds=seconds / rounds)) for _ in range(rounds)
    ]
    ordered = sorted(runs, key=lambda r: r["p99_ms"])
    return ordered[len(ordered) // 2], " / ".join(f"{r['p99_ms']}" for r in runs)


def rss_mb(stack: Stack, name: str) -> float:
    """Resident memory of a gunicorn master and its workers, in MB."""
    total_kb = 0
    for pid in [stack.procs[name].pid, *stack.worker_pids(name)]:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def cpu_s(stack: Stack, name: str) -> float:
    """CPU seconds (user + system) a gunicorn master and its workers have used."""
    ticks = 0
    for pid in [stack.procs[name].pid, *stack.worker_pids(name)]:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def costs(stack: Stack, client: redis.Redis) -> dict[str, float]:
    """What the processes have spent so far: CPU seconds of the gateway, the availability
    service and Redis, and Redis' GEOSEARCH and HGETALL calls (and GEOSEARCH's microseconds)."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    geo = stats.get("cmdstat_geosearch", {})
    return {
        "gateway": cpu_s(stack, "gateway"),
        "availability": cpu_s(stack, "availability"),
        "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "geosearch": float(geo.get("calls", 0)),
        "geosearch_us": float(geo.get("usec", 0)),
        "hgetall": float(stats.get("cmdstat_hgetall", {}).get("calls", 0)),
    }


def per_request(before: dict[str, float], after: dict[str, float], requests: float) -> str:
    """The costs of ``requests`` requests between two ``costs`` snapshots, per request."""
    d = {k: after[k] - before[k] for k in before}
    return (
        f"{1000 * d['gateway'] / requests:.2f} / {1000 * d['availability'] / requests:.2f}"
        f" / {1000 * d['redis'] / requests:.2f} ms CPU (gateway / availability / Redis);"
        f" GEOSEARCH {d['geosearch'] / requests:.2f} calls,"
        f" {d['geosearch_us'] / max(1.0, d['geosearch']):.0f} us each;"
        f" HGETALL {d['hgetall'] / requests:.1f} calls"
    )


def open_streams(base: str, lot_ids: list[str], count: int) -> tuple[list[socket.socket], int]:
    """``count`` idle SSE clients, opened 50 at a time, each kept once its first event came;
    and how many attempts failed (answered otherwise, or no first event in 30 s)."""
    host, port = base.removeprefix("http://").split(":")
    socks: list[socket.socket] = []
    failures = 0
    for _ in range(count):  # bounded: each round keeps at least one stream or counts a failure
        want = min(50, count - len(socks))
        if want <= 0:
            break
        batch = []
        sel = selectors.DefaultSelector()
        for n in range(want):
            s = socket.create_connection((host, int(port)), timeout=10)
            lot_id = lot_ids[(len(socks) + n) % len(lot_ids)]
            s.sendall(
                f"GET /v1/lots/{lot_id}/stream HTTP/1.1\r\nHost: {host}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, data=[b""])
            batch.append(s)
        deadline = time.monotonic() + 30
        pending = set(batch)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj  # type: ignore[assignment]
                data = s.recv(65536)
                key.data[0] += data
                if not data or not key.data[0].startswith(b"HTTP/1.1 200"):
                    if not data or b"\r\n\r\n" in key.data[0]:
                        pending.discard(s)
                        sel.unregister(s)
                        s.close()
                        failures += 1
                elif b"event: lot" in key.data[0]:
                    pending.discard(s)
                    sel.unregister(s)
                    socks.append(s)
        for s in pending:
            s.close()
            failures += 1
        sel.close()
        if failures > count:
            raise RuntimeError(f"{failures} streams failed to open")
    return socks, failures


def established(port: int) -> int:
    """TCP connections the server on ``port`` still holds (established, or closed by the
    client and not yet by the server), from ``ss``."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", "state", "close-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    )
    return len(out.stdout.splitlines())


def wait_streams_gone(stack: Stack, *, baseline: int, timeout: float = 60.0) -> float:
    """Seconds until the gateway let go of the streams the clients closed (it notices at its
    next heartbeat write), so the next phase does not measure their teardown; bounded."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if established(stack.ports["gateway"]) <= baseline:
            break
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def main() -> None:
    seconds = env_float("BENCH_SECONDS", 10)
    concurrency = int(env_float("BENCH_CONCURRENCY", 16))
    rate = env_float("BENCH_RATE", 1000)
    lots = int(env_float("BENCH_LOTS", 10_000))
    large = int(env_float("BENCH_LARGE_LOTS", 100_000))
    streams = int(env_float("BENCH_STREAM_CLIENTS", 1000))
    rng = random.Random(7)
    # load.run forks its clients' processes: each draws its own requests (with the parent's
    # state, both drew the same lots and points at the same moments, and a warm-up read half
    # the lots it meant to)
    os.register_at_fork(after_in_child=lambda: rng.seed(os.getpid()))
    gateway_workers = os.environ.get("BENCH_GATEWAY_WORKERS", "1")  # the Procfile's default
    with bench_stack(("gateway", "ingestion", "availability"), GATEWAY_WORKERS=gateway_workers) as (
        stack,
        _admin,
    ):
        client = connect(stack.redis_url, 30.0)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO operators (name) VALUES ('bench') RETURNING id"
            ).fetchone()
            assert row is not None
            started = time.perf_counter()
            ids = load_lots(conn, str(row[0]), lots, seed=1)
            refill(conn, client)
            loaded_s = time.perf_counter() - started

        def floor(_: int) -> load.Request:
            return ("GET", "/v1/lots/_ping", None, {})

        def detail(_: int) -> load.Request:
            return ("GET", f"/v1/lots/{rng.choice(ids)}", None, {})

        def nearby(_: int) -> load.Request:
            lat, lon = random_point(rng)
            return ("GET", f"/v1/lots?lat={lat:.6f}&lon={lon:.6f}&radius_m=1000", None, {})

        base = stack.url
        for make in (floor, detail, nearby):  # warm up every path
            load.run(base, make, concurrency=4, seconds=1, processes=1)
        rows: dict[str, object] = {
            "lots": lots,
            "gateway workers": gateway_workers,
            "load + redis refill s": round(loaded_s, 1),
        }
        # rounds alternate the endpoints, so a noisy neighbour slows them alike
        rounds = max(1, int(env_float("BENCH_ROUNDS", 3)))
        rps: dict[str, list[float]] = {"floor": [], "detail": [], "nearby": []}
        latencies: dict[str, list[float]] = {"floor": [], "detail": [], "nearby": []}
        for _ in range(rounds):
            for name, make in (("floor", floor), ("detail", detail), ("nearby", nearby)):
                r = load.run(base, make, concurrency=concurrency, seconds=seconds / rounds)
                assert r.statuses.get(200) == r.requests and not r.errors, (name, r.statuses)
                rps[name].append(r.rps)
                latencies[name] += r.latencies
        for name in rps:
            lat = summary(latencies[name])
            rows[f"{name} requests/s ({concurrency} clients)"] = round(sum(rps[name]) / rounds)
            rows[f"{name} p50/p99 ms"] = f"{lat['p50_ms']} / {lat['p99_ms']}"
        for name in ("detail", "nearby"):
            ratios = sorted(a / b for a, b in zip(rps[name], rps["floor"], strict=True))
            rows[f"{name} ratio to floor (median of {rounds} rounds)"] = round(
                ratios[len(ratios) // 2], 2
            )

        at_rate: dict[str, dict[str, float]] = {}
        for name, make in (("detail", detail), ("nearby", nearby)):
            spent = costs(stack, client)
            at_rate[name], p99s = at_rate_rounds(
                base, make, rate=rate, seconds=seconds, rounds=rounds
            )
            rows[f"{name} at {rate:.0f}/s p50/p99 ms (median round)"] = (
                f"{at_rate[name]['p50_ms']} / {at_rate[name]['p99_ms']}"
            )
            rows[f"{name} at {rate:.0f}/s p99 ms of each round"] = p99s
            rows[f"{name} at {rate:.0f}/s per request"] = per_request(
                spent, costs(stack, client), rate * seconds
            )

        if streams:
            names = ("gateway", "availability")
            before = {n: rss_mb(stack, n) for n in names}
            before_streams = established(stack.ports["gateway"])
            socks, opened_retries = open_streams(base, ids, streams)
            time.sleep(2)  # let allocations settle before measuring
            after = {n: rss_mb(stack, n) for n in names}
            with_streams, stream_p99s = at_rate_rounds(
                base, detail, rate=rate, seconds=seconds, rounds=rounds
            )
            for s in socks:
                s.close()
            settled = wait_streams_gone(stack, baseline=before_streams)
            rows[f"{streams} idle streams: failed attempts to open"] = opened_retries
            for n in names:
                rows[f"{streams} idle streams: {n} RSS MB before/after"] = (
                    f"{before[n]:.0f} / {after[n]:.0f}"
                )
            cost = sum(after.values()) - sum(before.values())
            rows[f"{streams} idle streams cost MB (gateway + availability)"] = round(cost, 1)
            label = f"detail at {rate:.0f}/s with {streams} idle streams"
            rows[f"{label} p50/p99 ms (median round)"] = (
                f"{with_streams['p50_ms']} / {with_streams['p99_ms']}"
            )
            rows[f"{label} p99 ms of each round"] = stream_p99s
            rows["closed streams released by the servers in s"] = settled

        if large > lots:
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                row = conn.execute(
                    "INSERT INTO operators (name) VALUES ('bench large') RETURNING id"
                ).fetchone()
                assert row is not None
                ids += load_lots(conn, str(row[0]), large - lots, seed=2)
                refill(conn, client)
            read = every_lot(base, ids, concurrency=concurrency)
            rows[f"warm-up: lots read once each (of {len(ids)})"] = read
            load.run(
                base,
                nearby,
                concurrency=concurrency,
                seconds=env_float("BENCH_LARGE_WARM_SECONDS", 6),
            )
            for name, make in (("detail", detail), ("nearby", nearby)):
                spent = costs(stack, client)
                big, big_p99s = at_rate_rounds(
                    base, make, rate=rate, seconds=seconds, rounds=rounds
                )
                rows[f"{name} at {rate:.0f}/s with {large} lots per request"] = per_request(
                    spent, costs(stack, client), rate * seconds
                )
                rows[f"{name} at {rate:.0f}/s with {large} lots p50/p99 ms (median round)"] = (
                    f"{big['p50_ms']} / {big['p99_ms']}"
                )
                rows[f"{name} at {rate:.0f}/s with {large} lots p99 ms of each round"] = big_p99s
                rows[f"{name} p99 ratio {large}/{lots} lots"] = round(
                    big["p99_ms"] / at_rate[name]["p99_ms"], 2
                )
            rows[f"availability RSS MB with {large} lots"] = round(rss_mb(stack, "availability"))
    report("bench-availability (through the gateway)", rows)


if __name__ == "__main__":
    main()
