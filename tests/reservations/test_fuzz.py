"""Bad input is a 4xx problem, never a 5xx: the reservations API fuzzed from its own OpenAPI
document (schemathesis), in process, as a signed-in driver, against the real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER, Principal, sign


@pytest.fixture
def api_schema(reservations_app: Any) -> Any:
    return schemathesis.openapi.from_wsgi("/openapi/openapi.json", reservations_app)


@pytest.fixture
def driver_headers(env: dict[str, str], conn: psycopg.Connection[Any]) -> dict[str, str]:
    row = conn.execute(
        "INSERT INTO drivers (email, password_hash) VALUES"
        " ('fuzz-' || gen_random_uuid() || '@example.com', 'x') RETURNING id::text"
    ).fetchone()
    assert row is not None
    principal = Principal("driver", row[0])
    return {
        PRINCIPAL_HEADER: principal.header,
        SIGNATURE_HEADER: sign(env["PARKING_INTERNAL_SECRET"].encode(), principal),
    }


def test_no_input_makes_a_server_error(api_schema: Any, driver_headers: dict[str, str]) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(headers=driver_headers)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)
            if response.status_code >= 400:
                assert response.headers["content-type"] == ["application/problem+json"]

        check()
