"""One OpenAPI document for the public API, merged from the services' own documents."""

from __future__ import annotations

import re
import threading
import time
from http import HTTPStatus
from typing import Any

import orjson

from gateway import routing
from gateway.proxy import Upstream

SECURITY_SCHEMES = {
    "adminKey": {"type": "http", "scheme": "bearer", "description": "PARKING_ADMIN_KEY"},
    "operatorKey": {"type": "http", "scheme": "bearer", "description": "operator API key"},
    "cityKey": {"type": "http", "scheme": "bearer", "description": "city API key"},
    "driverToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "driver access token from POST /v1/auth/token",
    },
}

ROLE_SCHEMES = {
    "admin": "adminKey",
    "operator": "operatorKey",
    "city": "cityKey",
    "driver": "driverToken",
}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"loc": {"type": "array"}, "msg": {"type": "string"}},
            },
        },
    },
}


class Merger:
    """Fetches and merges the services' documents; caches the result for a minute."""

    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        self.upstreams = upstreams
        self._doc: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def document(self) -> dict[str, Any]:
        with self._lock:
            if self._doc is None or time.monotonic() - self._at > 60:
                self._doc = self._merge()
                self._at = time.monotonic()
            return self._doc

    def _merge(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": {
                "title": "Smart parking platform API",
                "version": "1.0.0",
                "description": "Occupancy ingestion, availability, reservations and the city API.",
            },
            "servers": [{"url": "/"}],
            "paths": {},
            "components": {"schemas": {}, "securitySchemes": dict(SECURITY_SCHEMES)},
        }
        for name, upstream in self.upstreams.items():
            resp = upstream.forward("GET", "/openapi/openapi.json", {}, None)
            if resp.status != 200 or resp.body is None:
                continue
            part = orjson.loads(resp.body)
            for path, item in part.get("paths", {}).items():
                if path.startswith("/v1/"):
                    doc["paths"].setdefault(path, {}).update(item)
            schemas = part.get("components", {}).get("schemas", {})
            doc["components"]["schemas"].update(schemas)
            del name
        doc["components"]["schemas"]["Problem"] = PROBLEM_SCHEMA
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                if method in METHODS:
                    _complete(path, method.upper(), operation)
        return doc


def _complete(path: str, method: str, operation: dict[str, Any]) -> None:
    """Security from the gateway's routing table; the problems any route may answer."""
    concrete = re.sub(r"\{[^}]+\}", "x", path)
    route = routing.match(method, concrete, False) or routing.match(method, concrete, True)
    if route is not None:
        if route.roles >= routing.ANY_ROLE:
            operation["security"] = []
        else:
            operation["security"] = [
                {ROLE_SCHEMES[r]: []} for r in sorted(route.roles) if r in ROLE_SCHEMES
            ]
    responses = operation.setdefault("responses", {})
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    codes = [400, 401, 404, 413, 414, 415, 422, 429, 431, 500, 502, 503, 504]
    if route is None or operation.get("security"):
        codes.append(403)
    for code in codes:
        existing = responses.get(str(code))
        if existing is None or "application/json" in existing.get("content", {}):
            responses[str(code)] = {
                "description": (existing or {}).get("description") or HTTPStatus(code).phrase,
                "content": problem,
            }
