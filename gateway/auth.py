"""Authenticates the bearer credential of a request into a principal."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

from services.common.auth import Principal, hash_secret, parse_api_key, verify_token
from services.common.config import GatewaySettings
from services.common.db import Database
from services.common.errors import Problem


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, code="unauthorized", headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    """Admin key, API keys (looked up in PostgreSQL, cached briefly) and driver JWTs."""

    def __init__(self, settings: GatewaySettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._admin = settings.admin_key.get_secret_value().encode()
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None, client_addr: str) -> Principal:
        if not authorization:
            return Principal("anonymous", client_addr)
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise _unauthorized("use Authorization: Bearer <credential>")
        if hmac.compare_digest(credential.encode(), self._admin):
            return Principal("admin", "admin")
        if credential.startswith("pk_"):
            return self._api_key(credential)
        s = self.settings
        claims = verify_token(
            credential,
            secret=s.jwt_secret.get_secret_value(),
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
        )
        if claims is None:
            raise _unauthorized("the credential is not valid")
        return Principal("driver", str(claims["sub"]))

    def _api_key(self, key: str) -> Principal:
        cache_key = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        parsed = parse_api_key(key)
        if parsed is None:
            raise _unauthorized("the credential is not valid")
        role, key_id, secret = parsed
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT role, principal_id, secret_hash FROM api_keys"
                " WHERE key_id = %s AND revoked_at IS NULL",
                (key_id,),
            ).fetchone()
        if (
            row is None
            or row[0] != role
            or not hmac.compare_digest(bytes(row[2]), hash_secret(secret))
        ):
            raise _unauthorized("the credential is not valid")
        principal = Principal(role, str(row[1]))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[cache_key] = (now + self.settings.key_cache_ttl_s, principal)
        return principal
