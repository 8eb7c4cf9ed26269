"""Fixtures for reservation tests: lots made through the registry, drivers through the API."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from services.common.lots import LotIn
from services.ingestion.registry import create_lot
from tests.stack import Client, Stack

PASSWORD = "correct horse 1"
Tariff = {"currency": "CNY", "per_hour": "6.00", "free_minutes": 15, "daily_max": "40.00"}


@pytest.fixture
def make_lot(conn: psycopg.Connection[Any], new_operator: Any) -> Callable[..., str]:
    """``make_lot(reservable={"standard": 2}, ...)`` -> lot id, owned by a new operator."""

    def make(
        *,
        reservable: dict[str, int] | None = None,
        capacity: dict[str, int] | None = None,
        opening_hours: str = "24/7",
        timezone: str = "Asia/Shanghai",
        tariff: dict[str, Any] | None = None,
    ) -> str:
        operator_id, _ = new_operator("reservations-test")
        lot = LotIn.model_validate(
            {
                "name": f"Lot {uuid.uuid4().hex[:6]}",
                "location": {"lat": 30.1352, "lon": 120.0876},
                "district": "xihu",
                "opening_hours": opening_hours,
                "timezone": timezone,
                "capacity": capacity or {"standard": 20, "ev": 4},
                "reservable": reservable if reservable is not None else {"standard": 2},
                "tariff": tariff or Tariff,
            }
        )
        return str(create_lot(conn, operator_id=operator_id, lot=lot)["id"])

    return make


def sign_up(stack: Stack, email: str | None = None, password: str = PASSWORD) -> Client:
    """A driver signed up and logged in through the gateway."""
    anonymous = Client(stack.url)
    email = email or f"driver-{uuid.uuid4().hex[:10]}@example.com"
    resp = anonymous.post("/v1/drivers", json={"email": email, "password": password})
    assert resp.status_code == 201, resp.text
    token = anonymous.post("/v1/auth/token", json={"email": email, "password": password})
    assert token.status_code == 200, token.text
    return Client(stack.url, token.json()["access_token"])


@pytest.fixture
def driver(stack: Stack) -> Client:
    return sign_up(stack)


@pytest.fixture
def new_driver(stack: Stack) -> Callable[[], Client]:
    return lambda: sign_up(stack)
