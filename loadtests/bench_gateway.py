"""Gateway overhead: the lot-detail request sent straight to the availability service and
through the gateway, alternately in one run.

Prints the added p50/p99 latency (one client, sequential requests) and the throughput ratio
(gateway / direct, at saturation with concurrent clients), over BENCH_ROUNDS (4) alternating
rounds, with the Procfile's one gateway worker (BENCH_GATEWAY_WORKERS). Targets on the 2-core
machine: at most 1 ms added at p50 and a ratio of at least 0.7.
"""

from __future__ import annotations

import os

import psycopg

from loadtests import load
from loadtests.harness import bench_stack, report, summary
from services.common.lots import LotIn
from services.common.redis import connect
from services.ingestion.registry import create_lot, sync_lots_to_redis


def main() -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "8"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "16"))
    rounds = max(1, int(os.environ.get("BENCH_ROUNDS", "4")))
    env = {"GATEWAY_WORKERS": os.environ.get("BENCH_GATEWAY_WORKERS", "1")}  # the Procfile's
    env |= {k[len("BENCH_ENV_") :]: v for k, v in os.environ.items() if k.startswith("BENCH_ENV_")}
    with bench_stack(("gateway", "ingestion", "availability"), **env) as (stack, admin):
        op = admin.post("/v1/admin/operators", json={"name": "bench"}).json()
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            lot = create_lot(
                conn,
                operator_id=op["id"],
                lot=LotIn.model_validate(
                    {
                        "name": "Bench P1",
                        "location": {"lat": 30.25, "lon": 120.13},
                        "district": "xihu",
                        "capacity": {"standard": 100, "ev": 10},
                        "tariff": {"per_hour": "5.00"},
                    }
                ),
            )
            sync_lots_to_redis(conn, connect(stack.redis_url, 5.0))
        path = f"/v1/lots/{lot['id']}"

        def make(_: int) -> load.Request:
            return ("GET", path, None, {})

        targets = {"direct": stack.service_url("availability"), "gateway": stack.url}
        for base in targets.values():  # warm up both paths
            load.run(base, make, concurrency=4, seconds=1, processes=1)
        latency: dict[str, list[float]] = {"direct": [], "gateway": []}
        throughput: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(rounds):  # alternating, so a noisy neighbour slows both alike
            for name, base in targets.items():
                r = load.run(base, make, concurrency=1, seconds=seconds / rounds, processes=1)
                assert r.statuses.get(200) == r.requests and not r.errors, r.statuses
                latency[name] += r.latencies
            for name, base in targets.items():
                r = load.run(base, make, concurrency=concurrency, seconds=seconds / rounds)
                assert r.statuses.get(200) == r.requests and not r.errors, r.statuses
                throughput[name].append(r.rps)
    direct, gateway = summary(latency["direct"]), summary(latency["gateway"])
    direct_rps = sum(throughput["direct"]) / len(throughput["direct"])
    gateway_rps = sum(throughput["gateway"]) / len(throughput["gateway"])
    ratios = sorted(g / d for g, d in zip(throughput["gateway"], throughput["direct"], strict=True))
    report(
        "bench-gateway: GET /v1/lots/{id}",
        {
            "direct latency (1 client)": direct,
            "gateway latency (1 client)": gateway,
            "added p50 ms": round(gateway["p50_ms"] - direct["p50_ms"], 2),
            "added p99 ms": round(gateway["p99_ms"] - direct["p99_ms"], 2),
            f"direct requests/s ({concurrency} clients)": round(direct_rps),
            f"gateway requests/s ({concurrency} clients)": round(gateway_rps),
            "throughput ratio gateway/direct": round(gateway_rps / direct_rps, 2),
            f"throughput ratio, median of {rounds} rounds": round(ratios[len(ratios) // 2], 2),
            "gateway workers": env["GATEWAY_WORKERS"],
        },
    )


if __name__ == "__main__":
    main()
