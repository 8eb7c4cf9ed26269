"""The platform's skeleton through the real processes: gateway, services, worker and beat."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
import requests

from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER
from tests.stack import Client, Stack, wait_for

PROBLEM = "application/problem+json"


def test_every_process_answers_health_and_readiness(stack: Stack) -> None:
    for url in [stack.url] + [
        stack.service_url(n) for n in ("ingestion", "availability", "reservations")
    ]:
        assert requests.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
        ready = requests.get(url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_request_id_is_kept_or_made(stack: Stack, anonymous: Client) -> None:
    resp = anonymous.get(
        "/v1/lots/00000000-0000-0000-0000-000000000000", headers={"X-Request-ID": "abc-123"}
    )
    assert resp.headers["X-Request-ID"] == "abc-123"
    made = anonymous.get("/healthz").headers["X-Request-ID"]
    assert len(made) == 32


def test_admin_issues_operator_keys_that_work_once_hashed(
    stack: Stack, admin: Client, database_url: str
) -> None:
    resp = admin.post("/v1/admin/operators", json={"name": "Foundation Co"})
    assert resp.status_code == 201
    body = resp.json()
    assert set(body) == {"id", "name", "api_key"}
    operator = Client(stack.url, body["api_key"])
    mine = operator.get("/v1/lots?mine=1")
    assert mine.status_code == 200 and mine.json()["items"] == []
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT secret_hash FROM api_keys WHERE principal_id = %s", (body["id"],)
        ).fetchone()
    assert stored is not None and body["api_key"].encode() not in bytes(stored[0])
    city = admin.post("/v1/admin/city-keys", json={"name": "Hangzhou"})
    assert city.status_code == 201 and city.json()["api_key"].startswith("pk_city_")


def test_credentials_are_checked(stack: Stack, anonymous: Client, new_operator) -> None:
    _, operator = new_operator()
    no_cred = anonymous.post("/v1/admin/operators", json={"name": "x"})
    assert no_cred.status_code == 401 and no_cred.headers["Content-Type"] == PROBLEM
    assert no_cred.json()["code"] == "unauthorized"
    wrong_role = operator.post("/v1/admin/operators", json={"name": "x"})
    assert wrong_role.status_code == 403 and wrong_role.json()["code"] == "forbidden"
    for bad in ("pk_operator_0123456789abcdef_nope", "not-a-key", "a.b.c"):
        resp = Client(stack.url, bad).get("/v1/lots?mine=1")
        assert resp.status_code == 401, bad
    basic = anonymous.get("/v1/lots?mine=1", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert basic.status_code == 401


def test_a_client_cannot_forge_the_principal(stack: Stack, anonymous: Client) -> None:
    forged = {PRINCIPAL_HEADER: "admin:admin", SIGNATURE_HEADER: "0" * 64}
    via_gateway = anonymous.post("/v1/admin/operators", json={"name": "x"}, headers=forged)
    assert via_gateway.status_code == 401
    direct = requests.post(
        stack.service_url("ingestion") + "/v1/admin/operators",
        json={"name": "x"},
        headers=forged,
        timeout=5,
    )
    assert direct.status_code == 401


def test_bad_input_is_a_problem_and_changes_nothing(
    stack: Stack, admin: Client, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM operators").fetchone()
    for body in ({"name": ""}, {"nam": "x"}, {"name": "x" * 201}, ["x"]):
        resp = admin.post("/v1/admin/operators", json=body)
        assert resp.status_code == 422, body
        assert resp.headers["Content-Type"] == PROBLEM and resp.json()["errors"]
    malformed = admin.post(
        "/v1/admin/operators", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM operators").fetchone() == before


def test_body_size_is_bounded(stack: Stack, new_operator) -> None:
    _, operator = new_operator()
    big = b'{"events": [' + b" " * (1024 * 1024 + 10) + b"]}"
    resp = operator.post("/v1/events", data=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["code"] == "payload-too-large"


def test_unknown_routes_are_404_problems(anonymous: Client) -> None:
    for path in ("/v1/nothing", "/nothing"):
        resp = anonymous.get(path)
        assert resp.status_code == 404 and resp.headers["Content-Type"] == PROBLEM


def test_a_stopped_service_is_503_within_two_seconds(stack: Stack, anonymous: Client) -> None:
    stack.stop("availability")
    try:
        started = time.monotonic()
        resp = anonymous.get("/v1/lots/00000000-0000-0000-0000-000000000000")
        assert time.monotonic() - started < 2
        assert resp.status_code == 503 and resp.json()["code"] == "unavailable"
    finally:
        stack.start("availability")
    assert anonymous.get("/v1/lots/00000000-0000-0000-0000-000000000000").status_code == 404


def test_openapi_is_merged_and_docs_render_offline(anonymous: Client) -> None:
    doc = anonymous.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/admin/operators" in doc["paths"]
    assert {"adminKey", "operatorKey", "cityKey", "driverToken"} <= set(
        doc["components"]["securitySchemes"]
    )
    page = anonymous.get("/docs")
    assert page.status_code == 200 and "/docs/static/js/swagger-ui-bundle.js" in page.text
    assert anonymous.get("/docs/static/js/swagger-ui-bundle.js").status_code == 200


def test_metrics_are_exported(stack: Stack, anonymous: Client) -> None:
    anonymous.get("/healthz")
    text = anonymous.get("/metrics").text
    assert 'parking_http_request_duration_seconds_count{method="GET"' in text
    assert (
        "parking_db_pool"
        in requests.get(stack.service_url("ingestion") + "/metrics", timeout=5).text
    )


def test_beat_and_worker_run_the_partition_task(stack: Stack, database_url: str) -> None:
    # The stack runs the task with 10 days ahead; the migration alone makes 7. The beat may have
    # sent it before midnight UTC, so the day it made is 10 days after today or after yesterday.
    today = datetime.now(UTC)
    days = [(today + timedelta(days=ahead)).strftime("%Y%m%d") for ahead in (9, 10)]

    def created() -> bool:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT to_regclass(name) FROM unnest(%s::text[]) AS name",
                ([f"events_{day}" for day in days],),
            ).fetchall()
        return any(row[0] is not None for row in rows)

    wait_for(created, timeout=60, interval=0.5, what="the worker's partition task")


def test_cli_admin_operations(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "admin", "create-operator", "CLI Co"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = json.loads(out.stdout)["api_key"]
    assert Client(stack.url, key).get("/v1/lots?mine=1").status_code == 200


def test_methods_a_path_does_not_take_are_405_with_allow(anonymous: Client) -> None:
    put = anonymous.request("PUT", "/v1/lots", json={})
    assert put.status_code == 405 and put.json()["code"] == "method-not-allowed"
    assert put.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    options = anonymous.request("OPTIONS", "/v1/lots/abc")
    assert options.status_code == 204
    assert options.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH"


def test_odd_bytes_in_paths_are_4xx_not_5xx(anonymous: Client) -> None:
    for path in ("/v1/lots/%C2%9F%1C%C3%A3", "/v1/lots/%FF%FE/history", "/v1/lots/%00/quote"):
        assert anonymous.get(path).status_code in (404, 422), path


def test_protocol_level_refusals_are_problems_too(anonymous: Client) -> None:
    resp = anonymous.get("/v1/lots/" + "x" * 9000)
    assert resp.status_code == 414
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.json()["code"] == "uri-too-long"


def test_injection_shaped_paths_are_404(anonymous: Client) -> None:
    for path in ("/v1/lots/%27%20OR%201=1", "/v1/lots/a%20b/history", "/v1/lots/%0D%0Ax/quote"):
        assert anonymous.get(path).status_code in (404, 422), path


def test_pooled_connections_to_killed_workers_are_not_reused(stack: Stack, admin: Client) -> None:
    """A POST (never retried) must not land on a keep-alive connection whose worker died."""
    import os
    import signal

    for _ in range(20):  # warm the gateway's pools of connections to ingestion
        assert admin.post("/v1/admin/operators", json={"name": "warm"}).status_code == 201
    old = set(stack.worker_pids("ingestion"))
    for pid in old:
        os.kill(pid, signal.SIGKILL)

    def respawned() -> bool:
        pids = set(stack.worker_pids("ingestion"))
        return len(pids) >= len(old) and not pids & old

    wait_for(respawned, timeout=30, what="gunicorn to respawn the ingestion workers")
    stack.wait_ready("ingestion")
    statuses = [
        admin.post("/v1/admin/operators", json={"name": "after"}).status_code for _ in range(20)
    ]
    assert statuses == [201] * 20
