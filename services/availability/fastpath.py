"""Lot detail and nearby search as plain WSGI callables in front of the Flask app.

Lot detail is what drivers' apps poll, and most of its CPU went to the framework around it:
Flask's request context, URL matching and hooks, flask-openapi3 building a path model, werkzeug's
request and response objects. This path does only what the route needs, with the same code
underneath (``ReadPath.detail``: Redis first, PostgreSQL when Redis lacks the lot or is down),
the request id and the request metrics.

Nearby search ``GET /v1/lots?...``, the other read drivers' apps make all the time, is answered
here too when its query string is plain (no percent-encoding) and valid by the route's own
model, with the route's own code (``views.nearby_query``, ``ReadPath.nearby``,
``views.nearby_page``).

Lot detail answers only a lot it found. Anything else (an id that is not a UUID, an unknown
lot, other methods and routes) goes to the Flask app, which answers as it always has, so the
problems a client can get are the Flask route's. An error underneath is answered by the app's
own error handlers (503 for an outage, ...).

The benchmarks' floor, ``GET /v1/lots/_ping`` (a constant answer, kept out of the OpenAPI
document), is answered here too, so the ratio of lot detail to the floor measures the route's
own work on top of the same gateway, gunicorn worker and WSGI layer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from services.availability.readpath import ReadPath
from services.availability.views import NearbyParams, nearby_page, nearby_query
from services.common.app import REQUEST_ID_HEADER, dumps
from services.common.leanpath import Answer, LeanRoute, app_error, logged_as, request_id
from services.common.metrics import observe_request

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
SEARCH_PATH = "/v1/lots"
PREFIX = "/v1/lots/"
FLOOR_PATH = "/v1/lots/_ping"
FLOOR_BODY = b'{"ok":true}'
_JSON = ("Content-Type", "application/json")


class FastLots:
    """WSGI middleware: answers lot detail of a known lot and the floor, hands the rest on."""

    def __init__(self, app: Flask, wsgi_app: WSGIApp) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.lookups: ReadPath = app.extensions["availability"]
        self.lean = LeanRoute.of(app, "availability.lot_detail", "GET")
        self.lean_search = LeanRoute.of(app, "availability.nearby", "GET")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if path == SEARCH_PATH and environ.get("REQUEST_METHOD") == "GET":
            return self.search(environ, start_response)
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not path.startswith(PREFIX)
            or "/" in path[len(PREFIX) :]
        ):
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        rid = request_id(environ)
        if path == FLOOR_PATH:
            observe_request(self.lean.service, "GET", FLOOR_PATH, 200, started)
            start_response("200 OK", [_JSON, ("Content-Length", "11"), (REQUEST_ID_HEADER, rid)])
            return [FLOOR_BODY]
        lot_id = path[len(PREFIX) :]
        if not self.lookups.knows(lot_id):  # else canonical already
            try:
                lot_id = str(uuid.UUID(lot_id))
            except ValueError:
                return self.wsgi_app(environ, start_response)
        with logged_as(rid):
            try:
                found = self.lookups.detail(lot_id, datetime.now(UTC))
                if found is None:
                    return self.wsgi_app(environ, start_response)  # the route's own 404
                body = dumps(found[1])
                answer: Answer = (200, [_JSON, ("Content-Length", str(len(body)))], body)
            except Exception as exc:  # the app's error handlers answer (503 for an outage, ...)
                answer = app_error(self.app, environ, exc)
        return self.lean.respond(start_response, answer, rid=rid, started=started)

    def search(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Nearby search with a plain, valid query string; the Flask route answers the rest
        (its 422 problems among them)."""
        started = time.perf_counter()
        query_string: str = environ.get("QUERY_STRING", "")
        if "%" in query_string or "+" in query_string:
            return self.wsgi_app(environ, start_response)
        args: dict[str, str] = {}
        for part in query_string.split("&"):
            if part:
                name, _, value = part.partition("=")
                args.setdefault(name, value)  # the first value, as request.args.to_dict()
        try:
            query = nearby_query(NearbyParams.model_validate(args))
        except ValueError:  # pydantic's ValidationError is one, and so is a cursor not ours
            return self.wsgi_app(environ, start_response)
        rid = request_id(environ)
        with logged_as(rid):
            try:
                body = dumps(nearby_page(self.lookups.nearby(query, datetime.now(UTC))))
                answer: Answer = (200, [_JSON, ("Content-Length", str(len(body)))], body)
            except Exception as exc:  # the app's error handlers answer (503 for an outage, ...)
                answer = app_error(self.app, environ, exc)
        return self.lean_search.respond(start_response, answer, rid=rid, started=started)
