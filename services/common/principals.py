"""Repository functions for operators, city clients and their API keys."""

from __future__ import annotations

from typing import Any

import psycopg

from services.common.auth import new_api_key


def create_operator(conn: psycopg.Connection[Any], *, name: str) -> dict[str, str]:
    """Insert an operator and its first API key; return id, name and the key (shown once)."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO operators (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()
        assert row is not None
        operator_id = str(row[0])
        key = add_key(conn, role="operator", principal_id=operator_id)
    return {"id": operator_id, "name": name, "api_key": key}


def create_city_client(conn: psycopg.Connection[Any], *, name: str) -> dict[str, str]:
    """Insert a city client and its API key; return id, name and the key (shown once)."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO city_clients (name) VALUES (%s) RETURNING id", (name,)
        ).fetchone()
        assert row is not None
        client_id = str(row[0])
        key = add_key(conn, role="city", principal_id=client_id)
    return {"id": client_id, "name": name, "api_key": key}


def add_key(conn: psycopg.Connection[Any], *, role: str, principal_id: str) -> str:
    """Insert a new API key for the principal; return the full key."""
    key_id, key, secret_hash = new_api_key(role)
    conn.execute(
        "INSERT INTO api_keys (key_id, role, principal_id, secret_hash) VALUES (%s, %s, %s, %s)",
        (key_id, role, principal_id, secret_hash),
    )
    return key


def list_operators(conn: psycopg.Connection[Any]) -> list[dict[str, str]]:
    """Every operator, oldest first."""
    rows = conn.execute("SELECT id, name, created_at FROM operators ORDER BY created_at").fetchall()
    return [{"id": str(r[0]), "name": r[1], "created_at": r[2].isoformat()} for r in rows]
