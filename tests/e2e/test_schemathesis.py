"""Schemathesis against the running stack, once per principal, with every check.

Bounded: a few examples per operation and phase, a fixed seed (repeatable in CI), a time budget.
One setting differs from schemathesis' defaults, on purpose: the positive-data check also
accepts 422 for the cross-field business rules JSON Schema cannot state (exactly one of
`spaces` or `capacity`, `reservable` within capacity, a reservation window in the future and in
opening hours, an email address's form), and the negative-data check also counts the HTTP
server's own refusals of oversized requests (413, 414, 431) as rejections. Every other check,
`ignored_auth` included, runs as shipped.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Client, Stack

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def principals(stack: Stack, admin: Client) -> dict[str, dict[str, Any]]:
    """A credential per principal and the ids of objects it owns."""
    out: dict[str, dict[str, Any]] = {"anonymous": {"key": None, "params": {}}}
    out["admin"] = {"key": stack.admin_key, "params": {}}
    op = admin.post("/v1/admin/operators", json={"name": "schemathesis"}).json()
    operator = Client(stack.url, op["api_key"])
    lot = operator.post(
        "/v1/lots",
        json={
            "name": "Fuzz P1",
            "location": {"lat": 30.27, "lon": 120.15},
            "district": "xihu",
            "capacity": {"standard": 50, "ev": 5},
            "reservable": {"standard": 5},
            "tariff": {"per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"},
        },
    ).json()
    out["operator"] = {"key": op["api_key"], "params": {"path.lot_id": lot["id"]}}
    city = admin.post("/v1/admin/city-keys", json={"name": "schemathesis"}).json()
    out["city"] = {"key": city["api_key"], "params": {}}
    email = f"fuzz-{uuid.uuid4().hex[:8]}@example.com"
    anon = Client(stack.url)
    anon.post("/v1/drivers", json={"email": email, "password": "fuzzing-password"})
    token = anon.post("/v1/auth/token", json={"email": email, "password": "fuzzing-password"})
    driver = Client(stack.url, token.json()["access_token"])
    start = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    made = driver.post(
        "/v1/reservations",
        json={
            "lot_id": lot["id"],
            "space_type": "standard",
            "plate": "浙A99999",
            "start": start.isoformat(),
            "end": (start + timedelta(hours=1)).isoformat(),
        },
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert made.status_code == 201, made.text
    out["driver"] = {
        "key": token.json()["access_token"],
        "params": {"path.reservation_id": made.json()["id"]},
    }
    return out


CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422",
                     "428", "429", "431", "5xx"]
"""


@pytest.mark.parametrize("principal", ["anonymous", "admin", "operator", "driver", "city"])
def test_no_failures_for(
    stack: Stack, principals: dict[str, dict[str, Any]], principal: str, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    params = principals[principal]["params"]
    config.write_text(
        CONFIG
        + ("[parameters]\n" if params else "")
        + "".join(f'"{k}" = "{v}"\n' for k, v in params.items())
    )
    command = [
        str(BIN / "schemathesis"),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{stack.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "5",
        "--seed",
        "2026",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "10",
        "--exclude-path-regex",
        "/stream$",
        "--generation-database",
        "none",
        # one worker: hypothesis' reflection parses source with ``ast``, which CPython 3.11
        # can break on when threads do it at once ("AST constructor recursion depth mismatch")
        "--workers",
        "1",
    ]
    key = principals[principal]["key"]
    if key:
        command += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-15000:] + out.stderr[-3000:]
    assert "Tested: 2" in out.stdout  # every operation of the document was reached
