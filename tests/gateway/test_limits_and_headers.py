"""Rate limits, security headers and CORS, through a real gateway with low limits."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.stack import Client, Stack

ORIGIN = "https://app.example"
MISSING_LOT = "/v1/lots/00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def limited(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    limits = {
        "lookups": [5, 60],
        "events": [1000, 1],
        "city": [1000, 1],
        "account": [1000, 1],
        "default": [1000, 1],
    }
    stack = Stack(
        database_url,
        redis_url,
        Path(tmp_path_factory.mktemp("limited")),
        env_overrides={
            "PARKING_GATEWAY_RATE_LIMITS": json.dumps(limits),
            "PARKING_GATEWAY_CORS_ORIGINS": json.dumps([ORIGIN]),
            "PARKING_GATEWAY_TRUSTED_PROXIES": json.dumps(["127.0.0.1/32"]),
        },
        names=("gateway", "ingestion", "availability"),
    )
    with stack:
        yield stack


def _operator(stack: Stack, name: str) -> Client:
    admin = Client(stack.url, stack.admin_key)
    resp = admin.post("/v1/admin/operators", json={"name": name})
    assert resp.status_code == 201
    return Client(stack.url, resp.json()["api_key"])


def test_over_the_limit_is_429_with_retry_after(limited: Stack) -> None:
    client = _operator(limited, "limited-a")
    statuses = [client.get(MISSING_LOT).status_code for _ in range(5)]
    assert statuses == [404] * 5
    first = client.get(MISSING_LOT)
    assert first.status_code == 429
    assert first.headers["Content-Type"] == "application/problem+json"
    assert first.json()["code"] == "rate-limited"
    assert int(first.headers["Retry-After"]) >= 1
    assert first.headers["RateLimit-Policy"] == '"lookups";q=5;w=60'
    assert first.headers["RateLimit"].startswith('"lookups";r=0;t=')


def test_allowed_answers_carry_the_ratelimit_headers(limited: Stack) -> None:
    client = _operator(limited, "limited-b")
    resp = client.get(MISSING_LOT)
    assert resp.status_code == 404
    assert resp.headers["RateLimit"].startswith('"lookups";r=4;')


def test_one_client_over_its_limit_does_not_slow_another(limited: Stack) -> None:
    noisy, quiet = _operator(limited, "noisy"), _operator(limited, "quiet")
    baseline = []
    for _ in range(3):
        started = time.perf_counter()
        assert quiet.get(MISSING_LOT).status_code == 404
        baseline.append(time.perf_counter() - started)
    stop = threading.Event()
    refused = [0]
    noisy_key = noisy.session.headers["Authorization"].split()[1]

    def flood() -> None:
        session = Client(limited.url, noisy_key)
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            if session.get(MISSING_LOT).status_code == 429:
                refused[0] += 1

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    during, statuses = [], []
    try:
        deadline = time.monotonic() + 10
        while refused[0] < 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # let the flood get going: a load, not a synchronisation
        for _ in range(2):
            started = time.perf_counter()
            statuses.append(quiet.get(MISSING_LOT).status_code)
            during.append(time.perf_counter() - started)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert refused[0] >= 20
    assert statuses == [404, 404]  # the quiet client's own budget is untouched
    assert statistics.median(during) < max(0.25, 10 * statistics.median(baseline))


def test_anonymous_callers_are_limited_per_address(limited: Stack) -> None:
    # anonymous lookups from 127.0.0.1 share one bucket, apart from every principal's
    statuses = [requests.get(limited.url + MISSING_LOT, timeout=5).status_code for _ in range(7)]
    assert statuses.count(429) >= 2 and statuses[0] == 404


def test_a_trusted_proxy_names_the_client(limited: Stack) -> None:
    def get(client_ip: str) -> int:
        return requests.get(
            limited.url + MISSING_LOT, headers={"X-Forwarded-For": client_ip}, timeout=5
        ).status_code

    first = [get("203.0.113.7") for _ in range(6)]
    assert first[:5] == [404] * 5 and first[5] == 429
    assert get("203.0.113.8") == 404  # another client behind the same proxy: its own bucket


def test_security_headers_on_every_answer(limited: Stack) -> None:
    for path in ("/healthz", "/v1/nothing", "/openapi.json"):
        resp = requests.get(limited.url + path, timeout=5)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


def test_cors_allows_only_configured_origins(limited: Stack) -> None:
    ok = requests.options(
        limited.url + "/v1/events",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        timeout=5,
    )
    assert ok.status_code == 204
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Idempotency-Key" in ok.headers["Access-Control-Allow-Headers"]
    bad = requests.options(
        limited.url + "/v1/events",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=5,
    )
    assert bad.status_code == 403 and "Access-Control-Allow-Origin" not in bad.headers
    plain = requests.get(limited.url + "/healthz", headers={"Origin": ORIGIN}, timeout=5)
    assert plain.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in plain.headers["Access-Control-Expose-Headers"]
