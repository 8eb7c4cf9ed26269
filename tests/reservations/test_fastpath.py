"""The WSGI fast path of ``POST /v1/reservations`` answers as the Flask route does.

In process, as a signed-in driver, against the real PostgreSQL and Redis: well-formed bookings
are made by the fast path (the Flask app is not called), anything else reaches the Flask route
with its body intact, and the answers match the Flask route's.
"""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from werkzeug.test import Client

from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER, Principal, sign
from services.common.config import ReservationsSettings
from services.common.lots import LotIn
from services.ingestion.registry import create_lot
from services.reservations.fastpath import FastReserve
from tests.wsgi import Counting

START = (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


@pytest.fixture
def apps(reservations_app: Any) -> tuple[Client, Client, Counting]:
    """(client through the fast path, client of the Flask route alone, the counter)."""
    fast = reservations_app.wsgi_app
    assert isinstance(fast, FastReserve)
    counting = Counting(fast.wsgi_app)
    fast.wsgi_app = counting
    return Client(fast), Client(counting.app), counting


@pytest.fixture
def lot_id(env: dict[str, str], conn: psycopg.Connection[Any]) -> str:
    operator = conn.execute("INSERT INTO operators (name) VALUES ('fast') RETURNING id")
    lot = LotIn.model_validate(
        {
            "name": "fast",
            "location": {"lat": 30.0, "lon": 120.0},
            "district": "xihu",
            "capacity": {"standard": 10},
            "reservable": {"standard": 1},
            "tariff": {"per_hour": "5.00", "free_minutes": 15},
        }
    )
    operator_id = str(operator.fetchone()[0])  # type: ignore[index]
    return str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])


def principal_headers(env: dict[str, str], principal: Principal) -> dict[str, str]:
    return {
        PRINCIPAL_HEADER: principal.header,
        SIGNATURE_HEADER: sign(env["PARKING_INTERNAL_SECRET"].encode(), principal),
    }


@pytest.fixture
def driver(env: dict[str, str], conn: psycopg.Connection[Any]) -> dict[str, str]:
    row = conn.execute(
        "INSERT INTO drivers (email, password_hash) VALUES"
        " ('fast-' || gen_random_uuid() || '@example.com', 'x') RETURNING id::text"
    ).fetchone()
    assert row is not None
    return principal_headers(env, Principal("driver", row[0]))


def body(lot_id: str, hours: int = 0, **changes: Any) -> dict[str, Any]:
    start = START + timedelta(hours=hours)
    return {
        "lot_id": lot_id,
        "space_type": "standard",
        "start": start.isoformat(),
        "end": (start + timedelta(hours=1)).isoformat(),
        "plate": "浙A12345",
        **changes,
    }


def post(client: Client, headers: dict[str, str], data: bytes, **extra: str) -> Any:
    return client.post(
        "/v1/reservations",
        data=data,
        headers={"Content-Type": "application/json", **headers, **extra},
    )


def test_a_booking_and_its_replays_take_the_fast_path(
    apps: tuple[Client, Client, Counting], driver: dict[str, str], lot_id: str
) -> None:
    fast, _, counting = apps
    key = uuid.uuid4().hex
    data = orjson.dumps(body(lot_id))
    made = post(fast, driver, data, **{"Idempotency-Key": key, "X-Request-ID": "rid-1"})
    assert made.status_code == 201, made.get_data()
    assert made.headers["Content-Type"] == "application/json"
    assert made.headers["X-Request-ID"] == "rid-1"
    assert int(made.headers["Content-Length"]) == len(made.get_data())
    view = made.get_json()
    assert view["status"] == "confirmed" and view["price"] == {"amount": "3.75", "currency": "CNY"}
    again = post(fast, driver, data, **{"Idempotency-Key": key})
    assert again.status_code == 201 and again.get_data() == made.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = post(fast, driver, orjson.dumps(body(lot_id, 5)), **{"Idempotency-Key": key})
    assert reused.status_code == 422
    assert reused.headers["Content-Type"] == "application/problem+json"
    assert reused.get_json()["code"] == "idempotency-key-reused"
    full = post(fast, driver, orjson.dumps(body(lot_id)), **{"Idempotency-Key": uuid.uuid4().hex})
    assert full.status_code == 409 and full.get_json()["code"] == "no-capacity"
    assert full.headers["Content-Type"] == "application/problem+json"
    assert counting.calls == 0


def test_the_fast_and_the_flask_answers_agree(
    apps: tuple[Client, Client, Counting], driver: dict[str, str], lot_id: str
) -> None:
    fast, flask, _ = apps
    answers = []
    for n, client in enumerate((fast, flask)):
        data = orjson.dumps(body(lot_id, 10 * n))
        made = post(client, driver, data, **{"Idempotency-Key": uuid.uuid4().hex})
        full = post(client, driver, data, **{"Idempotency-Key": uuid.uuid4().hex})
        answers.append((made, full))
    (fast_made, fast_full), (flask_made, flask_full) = answers
    assert fast_made.status == flask_made.status == "201 CREATED"
    assert sorted(fast_made.headers.keys()) == sorted(flask_made.headers.keys())
    assert fast_made.headers["Content-Type"] == flask_made.headers["Content-Type"]
    assert fast_made.get_json().keys() == flask_made.get_json().keys()
    assert fast_full.status == flask_full.status == "409 CONFLICT"
    assert fast_full.get_data() == flask_full.get_data()
    assert sorted(fast_full.headers.keys()) == sorted(flask_full.headers.keys())


@pytest.mark.parametrize(
    "case",
    [
        "no-key",
        "long-key",
        "not-json",
        "form",
        "invalid",
        "extra-field",
        "list",
        "anonymous",
        "forged",
        "operator",
    ],
)
def test_anything_else_is_answered_by_the_flask_route(
    apps: tuple[Client, Client, Counting],
    env: dict[str, str],
    driver: dict[str, str],
    lot_id: str,
    case: str,
) -> None:
    fast, flask, counting = apps
    headers = dict(driver)
    extra = {"Idempotency-Key": uuid.uuid4().hex}
    data = orjson.dumps(body(lot_id))
    if case == "no-key":
        extra = {}
    elif case == "long-key":
        extra = {"Idempotency-Key": "k" * 256}
    elif case == "not-json":
        data = b'{"lot_id": '
    elif case == "form":
        extra["Content-Type"] = "application/x-www-form-urlencoded"
    elif case == "invalid":
        data = orjson.dumps(body(lot_id, plate="!!", start="tomorrow"))
    elif case == "extra-field":
        data = orjson.dumps(body(lot_id, price="0"))
    elif case == "list":
        data = orjson.dumps([body(lot_id)])
    elif case == "anonymous":
        headers = {}
    elif case == "forged":
        headers[SIGNATURE_HEADER] = "0" * 64
    elif case == "operator":
        headers = principal_headers(env, Principal("operator", str(uuid.uuid4())))
    answer = post(fast, headers, data, **extra)
    assert counting.calls == 1
    expected = post(flask, headers, data, **extra)
    assert answer.status_code == expected.status_code and answer.status_code in (
        400,
        401,
        403,
        415,
        422,
    )
    assert answer.get_data() == expected.get_data()
    assert answer.headers["Content-Type"] == "application/problem+json"


def test_an_outage_is_answered_by_the_apps_error_handlers(
    env: dict[str, str], driver: dict[str, str], lot_id: str
) -> None:
    from services.reservations.app import create_app

    with socket.socket() as s:  # a port with no PostgreSQL behind it: a real refused connection
        s.bind(("127.0.0.1", 0))
        dead = f"postgresql://postgres@127.0.0.1:{s.getsockname()[1]}/parking"
    app = create_app(
        ReservationsSettings.model_validate({"DATABASE_URL": dead, "PARKING_DB_POOL_TIMEOUT": 1.0})
    )
    fast = app.wsgi_app
    assert isinstance(fast, FastReserve)
    counting = Counting(fast.wsgi_app)
    fast.wsgi_app = counting
    answer = post(
        Client(fast), driver, orjson.dumps(body(lot_id)), **{"Idempotency-Key": uuid.uuid4().hex}
    )
    assert answer.status_code == 503
    assert answer.get_json()["code"] == "unavailable"
    assert answer.headers["Retry-After"] == "1"
    assert counting.calls == 0
