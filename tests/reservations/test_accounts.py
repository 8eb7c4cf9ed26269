"""Driver sign-up and access tokens, checked through the real gateway."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import jwt
import psycopg
import pytest

from tests.stack import Client, Stack

pytestmark = pytest.mark.e2e
PASSWORD = "correct horse 1"


def email() -> str:
    return f"d-{uuid.uuid4().hex[:10]}@example.com"


def test_sign_up_stores_an_argon2_hash_and_issues_short_tokens(
    stack: Stack, anonymous: Client, conn: psycopg.Connection[Any]
) -> None:
    address = email()
    made = anonymous.post("/v1/drivers", json={"email": address, "password": PASSWORD})
    assert made.status_code == 201
    assert set(made.json()) == {"id", "email"} and made.json()["email"] == address
    stored = conn.execute(
        "SELECT password_hash FROM drivers WHERE id = %s", (made.json()["id"],)
    ).fetchone()
    assert stored is not None and stored[0].startswith("$argon2id$") and PASSWORD not in stored[0]

    resp = anonymous.post("/v1/auth/token", json={"email": address.upper(), "password": PASSWORD})
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 900
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == made.json()["id"]
    assert claims["exp"] - claims["iat"] <= 900 and {"aud", "iss"} <= set(claims)
    mine = Client(stack.url, body["access_token"]).get("/v1/reservations")
    assert mine.status_code == 200 and mine.json() == {"items": [], "next_cursor": None}


def test_sign_up_rejects_taken_emails_and_bad_passwords(anonymous: Client) -> None:
    address = email()
    assert anonymous.post("/v1/drivers", json={"email": address, "password": PASSWORD}).ok
    again = anonymous.post("/v1/drivers", json={"email": address.upper(), "password": PASSWORD})
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    for body in (
        {"email": email(), "password": "short"},
        {"email": email(), "password": "x" * 257},
        {"email": "not-an-email", "password": PASSWORD},
        {"email": email()},
        {"email": email(), "password": PASSWORD, "role": "admin"},
    ):
        resp = anonymous.post("/v1/drivers", json=body)
        assert resp.status_code == 422, body
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert PASSWORD not in resp.text


def test_wrong_credentials_are_401_and_unknown_emails_take_as_long(anonymous: Client) -> None:
    address = email()
    assert anonymous.post("/v1/drivers", json={"email": address, "password": PASSWORD}).ok

    def timed(body: dict[str, str]) -> float:
        started = time.perf_counter()
        resp = anonymous.post("/v1/auth/token", json=body)
        assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"
        return time.perf_counter() - started

    wrong = min(timed({"email": address, "password": "wrong password"}) for _ in range(3))
    unknown = min(timed({"email": email(), "password": "wrong password"}) for _ in range(3))
    # Both verify one argon2 hash; without the dummy hash the unknown email would be ~100x faster.
    assert unknown > wrong / 3


def forge(claims: dict[str, Any], secret: str, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def test_the_gateway_rejects_bad_tokens(stack: Stack, driver: Client) -> None:
    token = driver.session.headers["Authorization"].split()[1]
    good = jwt.decode(token, options={"verify_signature": False})
    secret = stack.env["PARKING_JWT_SECRET"]
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = token.split(".")[1]
    now = int(time.time())
    bad = {
        "alg none": f"{header}.{payload}.",
        "wrong signature": forge(good, "another secret of at least thirty-two bytes"),
        "tampered": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        "wrong audience": forge({**good, "aud": "someone-else"}, secret),
        "wrong issuer": forge({**good, "iss": "someone-else"}, secret),
        "expired": forge({**good, "iat": now - 2000, "exp": now - 1000}, secret),
        "no exp": forge({k: v for k, v in good.items() if k != "exp"}, secret),
        "no aud": forge({k: v for k, v in good.items() if k != "aud"}, secret),
        "HS512": forge(good, secret, "HS512"),
    }
    assert Client(stack.url, token).get("/v1/reservations").status_code == 200
    for name, credential in bad.items():
        resp = Client(stack.url, credential).get("/v1/reservations")
        assert resp.status_code == 401, name
        assert resp.json()["code"] == "unauthorized", name
    assert Client(stack.url).get("/v1/reservations").status_code == 401


def test_operators_may_not_use_driver_routes(new_operator: Any) -> None:
    _, operator = new_operator()
    assert operator.get("/v1/reservations").status_code == 403
