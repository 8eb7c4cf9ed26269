"""The proxy path for ``/v1/...`` as a plain WSGI callable, in front of the Flask app.

Every API request passes here, so it does only what the gateway must: request id, route,
authentication, coarse role, rate limit, body bound, forward, and the answer's headers. Flask
serves the rest (health, metrics, the OpenAPI document and its docs page, CORS preflights).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import orjson
import redis

from gateway import routing
from gateway.auth import Authenticator
from gateway.proxy import Upstream
from gateway.ratelimit import RateLimiter
from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER, Principal, sign
from services.common.config import GatewaySettings
from services.common.errors import PROBLEM_JSON, Problem
from services.common.leanpath import logged_as, request_id
from services.common.metrics import ERRORS, REQUESTS

log = logging.getLogger("parking.gateway")
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_DROP = frozenset(
    {
        "HTTP_AUTHORIZATION",
        "HTTP_CONNECTION",
        "HTTP_EXPECT",  # answered here (100-continue); the body is forwarded whole
        "HTTP_KEEP_ALIVE",
        "HTTP_TE",
        "HTTP_TRAILER",
        "HTTP_UPGRADE",
        "HTTP_HOST",
        "HTTP_X_FORWARDED_FOR",
        "HTTP_X_REQUEST_ID",
        "HTTP_PROXY_AUTHORIZATION",
        "HTTP_TRANSFER_ENCODING",
        "HTTP_" + PRINCIPAL_HEADER.upper().replace("-", "_"),
        "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_"),
    }
)
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
]
MAX_SIGNATURES = 50_000  # principals remembered per worker before the table is cleared
CORS_EXPOSE = "X-Request-ID, RateLimit, RateLimit-Policy, Retry-After, Location"


class Proxy:
    """WSGI middleware: answers ``/v1/...`` itself, hands everything else to ``app``."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        settings: GatewaySettings,
        authenticator: Authenticator,
        limiter: RateLimiter,
        redis_client: Callable[[], redis.Redis],
        upstreams: dict[str, Upstream],
    ) -> None:
        self.app = app
        self.settings = settings
        self.authenticator = authenticator
        self.limiter = limiter
        self.redis_client = redis_client
        self.upstreams = upstreams
        self.secret = settings.internal_secret.get_secret_value().encode()
        self._signatures: dict[str, str] = {}
        self.max_body = settings.max_body_bytes
        self.origins = frozenset(settings.cors_origins)
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]
        self.extra_headers = list(SECURITY_HEADERS)
        if settings.hsts:
            self.extra_headers.append(
                ("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
            )

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/v1/") or (
            environ["REQUEST_METHOD"] == "OPTIONS"
            and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
        ):
            return self.app(environ, start_response)
        started = time.perf_counter()
        rid = request_id(environ)
        route: routing.Route | None = None
        body: Iterable[bytes]
        with logged_as(rid):
            try:
                route, status, headers, body = self._handle(environ, path, rid)
            except _Answer as answer:
                status, headers, body = answer.status, answer.headers, []
            except Problem as exc:
                status, headers, body = _problem(exc)
            except Exception:
                log.exception("gateway error")
                status, headers, body = _problem(Problem(500, "internal error", code="internal"))
        headers.append(("X-Request-ID", rid))
        headers.extend(self.extra_headers)
        if "HTTP_AUTHORIZATION" in environ:
            headers.append(("Cache-Control", "no-store"))
        origin = environ.get("HTTP_ORIGIN")
        if origin and (origin in self.origins or "*" in self.origins):
            headers += [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Expose-Headers", CORS_EXPOSE),
                ("Vary", "Origin"),
            ]
        label = route.pattern.pattern if route else "unmatched"
        REQUESTS.labels("gateway", environ["REQUEST_METHOD"], label, str(status)).observe(
            time.perf_counter() - started
        )
        if status >= 500:
            ERRORS.labels("gateway", label).inc()
        start_response(f"{status} {_reason(status)}", headers)
        return body

    def _handle(
        self, environ: dict[str, Any], path: str, rid: str
    ) -> tuple[routing.Route, int, list[tuple[str, str]], Iterable[bytes]]:
        method = environ["REQUEST_METHOD"]
        qs = environ.get("QUERY_STRING", "")
        mine = _mine(qs)
        route = routing.match(method, path, mine)
        if route is None:
            methods = routing.allowed(path)
            if not methods:
                raise Problem(404, "no such route", code="not-found")
            allow = ", ".join(
                sorted(methods | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set()))
            )
            if method == "OPTIONS":
                return_headers = [("Allow", allow), ("Content-Length", "0")]
                raise _Answer(204, return_headers)
            raise Problem(
                405,
                "method not allowed on this route",
                code="method-not-allowed",
                headers={"Allow": allow},
            )
        addr = self._client_address(environ)
        principal = self.authenticator.authenticate(environ.get("HTTP_AUTHORIZATION"), addr)
        if principal.role not in route.roles:
            if principal.role == "anonymous":
                raise Problem(
                    401,
                    "credentials required",
                    code="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            raise Problem(403, "this role may not use this route", code="forbidden")
        subject = principal.header if principal.role != "anonymous" else f"ip:{addr}"
        decision = self.limiter.check(self.redis_client(), route.group, subject)
        if decision is not None and not decision.allowed:
            raise Problem(
                429, "too many requests, slow down", code="rate-limited", headers=decision.headers()
            )
        body = self._body(environ) if method in ("POST", "PUT", "PATCH") else None
        headers = {
            _header_name(k): v
            for k, v in environ.items()
            if k.startswith("HTTP_") and k not in _DROP
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        headers["X-Request-ID"] = rid
        headers["X-Forwarded-For"] = addr
        headers[PRINCIPAL_HEADER] = principal.header
        headers[SIGNATURE_HEADER] = self._signature(principal)
        target = quote(path.encode("latin-1"), safe=_PATH_SAFE) + ("?" + qs if qs else "")
        upstream = self.upstreams[route.service].forward(
            method, target, headers, body, streaming=route.streaming
        )
        out = [(k, v) for k, v in upstream.headers if k.lower() != "x-request-id"]
        if decision is not None:
            out.extend(decision.headers().items())
        if upstream.chunks is not None:
            return route, upstream.status, out, upstream.chunks
        out.append(("Content-Length", str(len(upstream.body or b""))))
        return route, upstream.status, out, [upstream.body or b""]

    def _signature(self, principal: Principal) -> str:
        """The principal's signature, computed once per principal (an HMAC per request adds up)."""
        signature = self._signatures.get(principal.header)
        if signature is None:
            if len(self._signatures) >= MAX_SIGNATURES:
                self._signatures.clear()
            signature = self._signatures[principal.header] = sign(self.secret, principal)
        return signature

    def _client_address(self, environ: dict[str, Any]) -> str:
        """The peer, or the client a trusted proxy names as the last X-Forwarded-For hop."""
        addr = environ.get("REMOTE_ADDR") or "-"
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if not forwarded or not self.trusted or not _in(addr, self.trusted):
            return addr
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        while hops:  # walk back past every trusted proxy; the first untrusted hop is the client
            hop = hops.pop()
            if not _in(hop, self.trusted):
                return hop
        return addr

    def _body(self, environ: dict[str, Any]) -> bytes:
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        too_large = Problem(413, "request body too large", code="payload-too-large")
        if length:
            try:
                n = int(length)
            except ValueError:
                raise Problem(400, "bad Content-Length", code="bad-request") from None
            if n > self.max_body:
                raise too_large
            return bytes(stream.read(n))
        data = stream.read(self.max_body + 1)  # chunked: read at most one byte past the bound
        if len(data) > self.max_body:
            raise too_large
        return bytes(data)


class _Answer(Exception):
    """A non-error answer given early (OPTIONS), raised like a Problem."""

    def __init__(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers


def _in(addr: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _mine(qs: str) -> bool:
    if "mine=" not in qs:
        return False
    for part in qs.split("&"):
        name, _, value = part.partition("=")
        if name == "mine":
            return value.lower() in ("1", "true", "yes")
    return False


def _header_name(key: str) -> str:
    return "-".join(p.capitalize() for p in key[5:].split("_"))


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _problem(problem: Problem) -> tuple[int, list[tuple[str, str]], list[bytes]]:
    body = orjson.dumps(problem.body())
    headers = [
        *problem.headers.items(),
        ("Content-Type", PROBLEM_JSON),
        ("Content-Length", str(len(body))),
    ]
    return problem.status, headers, [body]
