"""Pure pieces of the shared library and the gateway: settings, principals, keys, routing."""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest

from gateway import routing
from services.common.auth import (
    Principal,
    hash_secret,
    issue_token,
    new_api_key,
    parse_api_key,
    plate_hash,
    sign,
    verify,
    verify_token,
)
from services.common.errors import Problem
from services.common.lots import is_open

SECRET = b"s" * 32
JWT = {"secret": "j" * 40, "issuer": "parking", "audience": "parking-api"}


def test_settings_fail_fast_naming_each_missing_variable() -> None:
    code = "from services.common.config import GatewaySettings, load; load(GatewaySettings)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "PARKING_INTERNAL_SECRET",
        "PARKING_ADMIN_KEY",
        "PARKING_JWT_SECRET",
    ):
        assert name in out.stderr
    assert "Traceback" not in out.stderr


def test_principal_signature_round_trip_and_forgery() -> None:
    p = Principal("operator", "42")
    assert verify(SECRET, p.header, sign(SECRET, p)) == p
    assert verify(SECRET, "admin:admin", sign(SECRET, p)) is None
    assert verify(b"x" * 32, p.header, sign(SECRET, p)) is None
    assert verify(SECRET, None, None) is None
    forged = Principal("root", "1")
    assert verify(SECRET, forged.header, sign(SECRET, forged)) is None


def test_api_keys_parse_and_hash() -> None:
    key_id, key, stored = new_api_key("operator")
    role, parsed_id, secret = parse_api_key(key) or ("", "", "")
    assert (role, parsed_id) == ("operator", key_id)
    assert hash_secret(secret) == stored and secret.encode() not in stored
    for bad in (
        "pk_admin_0123456789abcdef_x",
        "pk_operator_short_x",
        "pk_operator_0123456789abcdef_",
        "nope",
    ):
        assert parse_api_key(bad) is None


def test_tokens_reject_none_alg_wrong_key_audience_and_expiry() -> None:
    token = issue_token(subject="d1", ttl_s=60, **JWT)
    assert verify_token(token, **JWT)["sub"] == "d1"  # type: ignore[index]
    now = int(time.time())
    claims = {"sub": "d1", "iss": "parking", "aud": "parking-api", "exp": now + 60}
    unsigned = jwt.encode(claims, key="", algorithm="none")
    assert verify_token(unsigned, **JWT) is None
    assert verify_token(jwt.encode(claims, "k" * 40, algorithm="HS256"), **JWT) is None
    wrong_aud = jwt.encode({**claims, "aud": "other"}, JWT["secret"], algorithm="HS256")
    assert verify_token(wrong_aud, **JWT) is None
    expired = jwt.encode({**claims, "exp": now - 5}, JWT["secret"], algorithm="HS256")
    assert verify_token(expired, **JWT) is None
    no_exp = jwt.encode({k: v for k, v in claims.items() if k != "exp"}, JWT["secret"])
    assert verify_token(no_exp, **JWT) is None


def test_plates_are_hashed_under_a_key_after_normalising() -> None:
    assert plate_hash("k", "浙A 12345") == plate_hash("k", "浙a12345")
    assert plate_hash("k", "浙A12345") != plate_hash("other", "浙A12345")
    assert b"12345" not in plate_hash("k", "浙A12345")


@pytest.mark.parametrize(
    ("method", "path", "mine", "service", "roles"),
    [
        ("POST", "/v1/admin/operators", False, "ingestion", {"admin"}),
        ("POST", "/v1/events", False, "ingestion", {"operator"}),
        ("GET", "/v1/lots", False, "availability", routing.ANY_ROLE),
        ("GET", "/v1/lots", True, "ingestion", {"operator"}),
        ("GET", "/v1/lots/abc", False, "availability", routing.ANY_ROLE),
        ("GET", "/v1/lots/abc", True, "ingestion", {"operator"}),
        ("PATCH", "/v1/lots/abc", False, "ingestion", {"operator"}),
        ("GET", "/v1/lots/abc/stream", False, "availability", routing.ANY_ROLE),
        ("GET", "/v1/lots/abc/quote", False, "reservations", routing.ANY_ROLE),
        ("GET", "/v1/city/snapshot", False, "availability", {"city"}),
        ("POST", "/v1/reservations/x/cancel", False, "reservations", {"driver"}),
        ("POST", "/v1/auth/token", False, "reservations", routing.ANY_ROLE),
    ],
)
def test_routing_table(method: str, path: str, mine: bool, service: str, roles: set[str]) -> None:
    route = routing.match(method, path, mine)
    assert route is not None and route.service == service and route.roles == frozenset(roles)


def test_unknown_paths_have_no_route() -> None:
    assert routing.match("GET", "/v1/nothing", False) is None
    assert routing.match("GET", "/v1/lots/a/b/c", False) is None
    assert routing.allowed("/v1/lots/a/b/c") == set()
    assert routing.match("PUT", "/v1/lots", False) is None
    assert routing.allowed("/v1/lots") == {"GET", "POST"}
    assert routing.allowed("/v1/lots/x") == {"GET", "PATCH", "DELETE"}


def test_problem_body_shape() -> None:
    body = Problem(409, "full", code="no-capacity").body()
    assert body["status"] == 409 and body["code"] == "no-capacity" and body["title"] == "Conflict"
    assert set(body) == {"type", "title", "status", "detail", "code"}


def test_opening_hours() -> None:
    from datetime import UTC, datetime

    noon_shanghai = datetime(2026, 1, 1, 4, 0, tzinfo=UTC)
    midnight_shanghai = datetime(2026, 1, 1, 16, 30, tzinfo=UTC)
    assert is_open("24/7", "Asia/Shanghai", midnight_shanghai)
    assert is_open("07:00-23:00", "Asia/Shanghai", noon_shanghai)
    assert not is_open("07:00-23:00", "Asia/Shanghai", midnight_shanghai)
    assert is_open("22:00-06:00", "Asia/Shanghai", midnight_shanghai)
    assert not is_open("22:00-06:00", "Asia/Shanghai", noon_shanghai)


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    from gateway.fastpath import Proxy
    from services.common.config import GatewaySettings

    def proxy(trusted: list[str]) -> Proxy:
        settings = GatewaySettings(
            trusted_proxies=trusted,
            **{
                "DATABASE_URL": "postgresql://x@127.0.0.1/x",
                "REDIS_URL": "redis://127.0.0.1:1",
                "PARKING_INTERNAL_SECRET": "i" * 32,
                "PARKING_JWT_SECRET": "j" * 40,
                "PARKING_ADMIN_KEY": "a" * 32,
            },
        )
        return Proxy(
            lambda e, s: [],
            settings=settings,
            authenticator=None,  # type: ignore[arg-type]
            limiter=None,
            redis_client=None,
            upstreams={},
        )  # type: ignore[arg-type]

    env = {"REMOTE_ADDR": "10.0.0.5", "HTTP_X_FORWARDED_FOR": "198.51.100.1, 203.0.113.9"}
    assert proxy([])._client_address(env) == "10.0.0.5"
    assert proxy(["10.0.0.0/8"])._client_address(env) == "203.0.113.9"
    assert proxy(["10.0.0.0/8", "203.0.113.9"])._client_address(env) == "198.51.100.1"
    assert proxy(["192.168.0.0/16"])._client_address(env) == "10.0.0.5"


def test_request_ids_are_fresh_in_every_forked_worker() -> None:
    """Request ids come from the process's generator: 32 hex digits, and a worker forked from a
    master draws its own (the generator is reseeded at fork), never the master's or a sibling's."""
    import os

    from services.common.app import _REQUEST_ID_OK, new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 and _REQUEST_ID_OK.match(i) for i in ids)
    drawn = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: its first id, to the parent
            os.write(write, new_request_id().encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            drawn.append(f.read())
        os.waitpid(pid, 0)
    drawn.append(new_request_id())  # and the master's next
    assert len(set(drawn)) == 3, drawn
