"""The gateway: the platform's only public entry point.

Authenticates each request, checks the route's coarse role, and forwards it to the service that
owns the path with the verified principal signed in internal headers.
"""

from __future__ import annotations

from pathlib import Path

import flask_openapi3_swagger
import orjson
from flask import Flask, Response, request, send_from_directory
from flask.typing import ResponseReturnValue

from gateway.auth import Authenticator
from gateway.fastpath import Proxy
from gateway.openapi import Merger
from gateway.proxy import Upstream
from gateway.ratelimit import RateLimiter
from services.common import health, logs, metrics
from services.common.app import init_request_id
from services.common.config import GatewaySettings, load
from services.common.db import POOL_STATS, Database
from services.common.errors import Problem, register_error_handlers
from services.common.redis import RedisClient

SWAGGER = Path(flask_openapi3_swagger.__file__).parent / "templates" / "swagger"
DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Smart parking API</title>
<link rel="stylesheet" href="/docs/static/css/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/static/js/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", deepLinking: true});</script>
</body></html>"""


def create_app(settings: GatewaySettings | None = None) -> Flask:
    settings = settings or load(GatewaySettings)
    logs.configure("gateway", settings.log_level)
    app = Flask(__name__)
    app.config["PARKING_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    db = Database(settings, "gateway")
    POOL_STATS.databases.append(db)
    redis_client = RedisClient(settings)
    authenticator = Authenticator(settings, db)
    upstreams = {
        name: Upstream(
            name,
            url,
            pool_size=settings.pool_size,
            connect_s=settings.connect_timeout_s,
            read_s=settings.read_timeout_s,
        )
        for name, url in (
            ("ingestion", settings.ingestion_url),
            ("availability", settings.availability_url),
            ("reservations", settings.reservations_url),
        )
    }
    merger = Merger(upstreams)
    limiter = RateLimiter(settings.rate_limits, settings.rate_limit_enabled)

    init_request_id(app)
    register_error_handlers(app)
    metrics.init_app(app, "gateway")
    init_security_headers(app, settings)
    health.init_app(app, {"postgresql": db.ping, "redis": redis_client.ping})

    @app.get("/openapi.json")
    def openapi() -> ResponseReturnValue:
        return Response(orjson.dumps(merger.document()), mimetype="application/json")

    @app.get("/docs")
    def docs() -> ResponseReturnValue:
        return Response(DOCS_HTML, mimetype="text/html")

    @app.get("/docs/static/<path:name>")
    def docs_static(name: str) -> ResponseReturnValue:
        return send_from_directory(SWAGGER, name)

    app.wsgi_app = Proxy(  # type: ignore[method-assign]
        app.wsgi_app,
        settings=settings,
        authenticator=authenticator,
        limiter=limiter,
        redis_client=lambda: redis_client.client,
        upstreams=upstreams,
    )
    return app


API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; frame-ancestors 'none'"
)
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID, Last-Event-ID"
CORS_EXPOSE_HEADERS = "X-Request-ID, RateLimit, RateLimit-Policy, Retry-After, Location"


def init_security_headers(app: Flask, settings: GatewaySettings) -> None:
    """Security headers on every answer; CORS for the configured origins only."""
    allowed = frozenset(settings.cors_origins)

    @app.before_request
    def _preflight() -> Response | None:
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and origin
            and request.headers.get("Access-Control-Request-Method")
        ):
            if origin not in allowed and "*" not in allowed:
                raise Problem(403, "origin not allowed", code="forbidden")
            return Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault(
            "Content-Security-Policy", DOCS_CSP if request.path.startswith("/docs") else API_CSP
        )
        if settings.hsts:
            h.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if request.headers.get("Authorization"):
            h.setdefault("Cache-Control", "no-store")
        origin = request.headers.get("Origin")
        if origin and (origin in allowed or "*" in allowed):
            h["Access-Control-Allow-Origin"] = origin
            h["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            h.add("Vary", "Origin")
        return response
