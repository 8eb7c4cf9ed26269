"""Small helpers shared by the reservation tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import requests
from argon2 import PasswordHasher

from services.common.auth import issue_token
from tests.stack import Client, Stack


def hour(n: float, base: datetime | None = None) -> datetime:
    """``n`` hours after a base time one day from now, rounded to the minute (stable windows)."""
    base = base or (datetime.now(UTC) + timedelta(days=1)).replace(second=0, microsecond=0)
    return base + timedelta(hours=n)


def iso(at: datetime) -> str:
    return at.isoformat()


def reserve(
    client: Client,
    lot_id: str,
    start: datetime,
    end: datetime,
    *,
    key: str | None = None,
    plate: str = "浙A12345",
    space_type: str = "standard",
) -> requests.Response:
    return client.post(
        "/v1/reservations",
        json={
            "lot_id": lot_id,
            "space_type": space_type,
            "start": iso(start),
            "end": iso(end),
            "plate": plate,
        },
        headers={"Idempotency-Key": key or uuid.uuid4().hex},
    )


_HASH: list[str] = []


def mint_tokens(stack: Stack, conn: psycopg.Connection[Any], n: int) -> list[tuple[str, str]]:
    """``n`` drivers inserted directly, with tokens issued as the service does: (id, token).

    For load: signing up hundreds of drivers would spend the time hashing passwords.
    """
    if not _HASH:
        _HASH.append(PasswordHasher().hash("not used by these drivers"))
    rows = conn.execute(
        "INSERT INTO drivers (email, password_hash)"
        " SELECT 'load-' || gen_random_uuid() || '@example.com', %s FROM generate_series(1, %s)"
        " RETURNING id::text",
        (_HASH[0], n),
    ).fetchall()
    env = stack.env
    return [
        (
            r[0],
            issue_token(
                secret=env["PARKING_JWT_SECRET"],
                issuer=env.get("PARKING_JWT_ISSUER", "parking"),
                audience=env.get("PARKING_JWT_AUDIENCE", "parking-api"),
                subject=r[0],
                ttl_s=900,
            ),
        )
        for r in rows
    ]


def mint_drivers(stack: Stack, conn: psycopg.Connection[Any], n: int) -> list[Client]:
    """``n`` drivers (see :func:`mint_tokens`) as gateway clients."""
    return [Client(stack.url, token) for _, token in mint_tokens(stack, conn, n)]
