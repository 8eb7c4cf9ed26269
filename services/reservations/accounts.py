"""Driver accounts: sign-up with argon2-hashed passwords, and short-lived access tokens."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.common.auth import issue_token
from services.common.config import ReservationsSettings
from services.common.errors import Problem
from services.reservations import repository as repo

_hasher = PasswordHasher()
_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


def _dummy() -> str:
    """A hash to verify against when the email is unknown, so both cases take as long."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash("not a password anyone has")
        return _dummy_hash


def sign_up(conn: psycopg.Connection[Any], *, email: str, password: str) -> dict[str, str]:
    """Create a driver; 409 if the email is taken."""
    row = repo.create_driver(conn, email=email, password_hash=_hasher.hash(password))
    if row is None:
        raise Problem(409, "a driver with this email exists", code="conflict")
    return {"id": str(row["id"]), "email": row["email"]}


def authenticate(conn: psycopg.Connection[Any], *, email: str, password: str) -> str:
    """The driver id for these credentials, else 401 (as slow for unknown emails)."""
    found = repo.driver_credentials(conn, email=email)
    stored = found[1] if found else _dummy()
    try:
        _hasher.verify(stored, password)
        ok = found is not None
    except (VerificationError, InvalidHashError):
        ok = False
    if not ok or found is None:
        raise Problem(
            401,
            "wrong email or password",
            code="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    driver_id = found[0]
    if _hasher.check_needs_rehash(stored):
        repo.set_password_hash(conn, driver_id=driver_id, password_hash=_hasher.hash(password))
    return driver_id


def token_for(settings: ReservationsSettings, driver_id: str) -> dict[str, Any]:
    ttl = settings.access_token_ttl_s
    token = issue_token(
        secret=settings.jwt_secret.get_secret_value(),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        subject=driver_id,
        ttl_s=ttl,
    )
    return {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
