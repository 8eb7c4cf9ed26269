"""Principals: who is calling.

The gateway authenticates every request (admin key, operator/city API keys, driver JWTs) and
passes the verified principal to the services in ``X-Parking-Principal``, signed with the
internal secret in ``X-Parking-Principal-Signature``. The gateway drops both headers from
client requests, and a service trusts the principal only when the signature verifies, so a
client cannot forge one even by reaching a service directly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, Literal, ParamSpec, TypeVar

import jwt
from flask import current_app, g, request

from services.common.errors import Problem

Role = Literal["admin", "operator", "city", "driver", "anonymous"]
ROLES: tuple[str, ...] = ("admin", "operator", "city", "driver", "anonymous")
PRINCIPAL_HEADER = "X-Parking-Principal"
SIGNATURE_HEADER = "X-Parking-Principal-Signature"
JWT_ALGORITHMS = ["HS256"]


@dataclass(frozen=True, slots=True)
class Principal:
    role: str
    id: str

    @property
    def header(self) -> str:
        return f"{self.role}:{self.id}"


def sign(secret: bytes, principal: Principal) -> str:
    return hmac.new(secret, principal.header.encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes, header: str | None, signature: str | None) -> Principal | None:
    """The principal in ``header`` if ``signature`` is right, else None."""
    if not header or not signature:
        return None
    expected = hmac.new(secret, header.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return None
    role, _, ident = header.partition(":")
    if role not in ROLES:
        return None
    return Principal(role, ident)


def current_principal() -> Principal:
    """The verified principal of this request; anonymous if none was passed or it is forged."""
    principal = g.get("principal")
    if principal is None:
        secret = current_app.config["PARKING_SETTINGS"].internal_secret.get_secret_value()
        principal = verify(
            secret.encode(),
            request.headers.get(PRINCIPAL_HEADER),
            request.headers.get(SIGNATURE_HEADER),
        ) or Principal("anonymous", request.remote_addr or "-")
        g.principal = principal
    return principal


P = ParamSpec("P")
R = TypeVar("R")


def require(*roles: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Allow only ``roles``: anonymous callers get 401, other roles 403."""

    def decorator(view: Callable[P, R]) -> Callable[P, R]:
        @wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            principal = current_principal()
            if principal.role not in roles:
                if principal.role == "anonymous":
                    raise Problem(
                        401,
                        "credentials required",
                        code="unauthorized",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                raise Problem(403, "this role may not use this route", code="forbidden")
            return view(*args, **kwargs)

        return wrapper

    return decorator


# API keys -------------------------------------------------------------------------------------
# A key reads ``pk_<role>_<key id>_<secret>``. The secret has 256 bits of entropy, so one SHA-256
# of it is as strong as a slow password hash would be, and cheap enough to verify per request.


def new_api_key(role: str) -> tuple[str, str, bytes]:
    """(key id, the full key to show once, the hash to store)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, f"pk_{role}_{key_id}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_api_key(key: str) -> tuple[str, str, str] | None:
    """(role, key id, secret) of a well-formed key, else None."""
    parts = key.split("_", 3)
    if len(parts) != 4 or parts[0] != "pk" or parts[1] not in ("operator", "city"):
        return None
    if len(parts[2]) != 16 or not parts[3]:
        return None
    return parts[1], parts[2], parts[3]


# Driver access tokens -------------------------------------------------------------------------


def issue_token(*, secret: str, issuer: str, audience: str, subject: str, ttl_s: int) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iss": issuer, "aud": audience, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(token: str, *, secret: str, issuer: str, audience: str) -> dict[str, Any] | None:
    """The claims of a valid token (fixed algorithms; exp, aud, iss, sub required), else None."""
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=JWT_ALGORITHMS,
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "aud", "iss", "sub"]},
        )
    except jwt.PyJWTError:
        return None


def plate_hash(key: str, plate: str) -> bytes:
    """A licence plate as stored: keyed HMAC-SHA256 of its normalised form, never the plate."""
    normalised = "".join(plate.split()).upper()
    return hmac.new(key.encode(), normalised.encode(), hashlib.sha256).digest()
