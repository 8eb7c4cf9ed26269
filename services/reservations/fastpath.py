"""``POST /v1/reservations`` as a plain WSGI callable in front of the Flask app.

A booking is the service's hot route, and most of its CPU went to the framework around it:
Flask's request context, URL matching and hooks, flask-openapi3 copying every header into a
model, werkzeug's request and response objects. This path does only what the route needs, with
the same code underneath (the signed principal, ``ReservationIn``, ``booking.reserve``, the
cached reserved counts dropped after commit, the request id, the request metrics).

It takes only requests that are well-formed for the route: a driver principal whose signature
verifies, an ``Idempotency-Key`` of 1 to 255 characters, an ``application/json`` body of a
stated length that parses into a valid ``ReservationIn``. Anything else goes, body included, to
the Flask route, which answers as it always has (401/403, 400, 415, 422 with the errors by
location), so the problems a client can get are the Flask route's, answered by the Flask route.
An error in the booking itself is answered by the app's own error handlers.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask
from pydantic import ValidationError

from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER, verify
from services.common.errors import PROBLEM_JSON, Problem
from services.common.leanpath import LeanRoute, app_error, logged_as, request_id
from services.reservations import booking
from services.reservations.lifecycle import forget_reserved
from services.reservations.schemas import ReservationIn

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
PATH = "/v1/reservations"
MAX_KEY_LENGTH = 255
MAX_BODY = 64 * 1024  # a reservation is a few hundred bytes; larger bodies take the Flask route
_PRINCIPAL = "HTTP_" + PRINCIPAL_HEADER.upper().replace("-", "_")
_SIGNATURE = "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_")


class FastReserve:
    """WSGI middleware: books well-formed ``POST /v1/reservations``, hands the rest to ``app``."""

    def __init__(self, app: Flask, wsgi_app: WSGIApp) -> None:
        settings = app.config["PARKING_SETTINGS"]
        self.app = app
        self.wsgi_app = wsgi_app
        self.settings = settings
        self.secret = settings.internal_secret.get_secret_value().encode()
        self.db = app.extensions["parking_db"]
        self.redis = app.extensions["parking_redis"]
        self.lean = LeanRoute.of(app, "reservations.create", "POST")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        accepted = self._accept(environ)
        if accepted is None:
            return self.wsgi_app(environ, start_response)
        driver_id, key, raw, request = accepted
        rid = request_id(environ)
        with logged_as(rid):
            answer = self._reserve(environ, driver_id, key, raw, request)
        return self.lean.respond(start_response, answer, rid=rid, started=started)

    def _accept(self, environ: dict[str, Any]) -> tuple[str, str, Any, ReservationIn] | None:
        """(driver id, key, raw body, request) of a well-formed request, else None (with the
        body, if read, put back for the Flask route)."""
        principal = verify(self.secret, environ.get(_PRINCIPAL), environ.get(_SIGNATURE))
        if principal is None or principal.role != "driver":
            return None
        driver_id = booking.parse_uuid(principal.id)
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if driver_id is None or not key or len(key) > MAX_KEY_LENGTH:
            return None
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        length = environ.get("CONTENT_LENGTH", "")
        if mimetype != "application/json" or not length.isdigit() or int(length) > MAX_BODY:
            return None
        data = environ["wsgi.input"].read(int(length))
        try:
            raw = orjson.loads(data)
            if isinstance(raw, dict):
                return driver_id, key, raw, ReservationIn.model_validate(raw)
        except (orjson.JSONDecodeError, ValidationError):
            pass
        environ["wsgi.input"] = io.BytesIO(data)
        return None

    def _reserve(
        self,
        environ: dict[str, Any],
        driver_id: str,
        key: str,
        raw: Any,
        request: ReservationIn,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            with self.db.connection() as conn:
                answer = booking.reserve(
                    conn,
                    settings=self.settings,
                    driver_id=driver_id,
                    key=key,
                    raw_body=raw,
                    request=request,
                    now=datetime.now(UTC),
                )
            forget_reserved(self.redis.client, answer.lot_ids)
        except Problem as exc:
            body = orjson.dumps(exc.body())
            headers = [("Content-Type", PROBLEM_JSON), ("Content-Length", str(len(body)))]
            return exc.status, [*headers, *exc.headers.items()], body
        except Exception as exc:  # the app's error handlers answer (503 for an outage, ...)
            return app_error(self.app, environ, exc)
        # keys sorted, so a replay is byte for byte the first answer (as views._answer)
        body = orjson.dumps(answer.body, option=orjson.OPT_SORT_KEYS)
        mimetype = PROBLEM_JSON if answer.status >= 400 else "application/json"
        headers = [("Content-Type", mimetype), ("Content-Length", str(len(body)))]
        if answer.replayed:
            headers.append(("Idempotent-Replayed", "true"))
        return answer.status, headers, body
