"""``POST /v1/events`` as a plain WSGI callable in front of the Flask app.

Event batches are the service's hot route. Once the batch is applied set-based in PostgreSQL
(intake.py), a good part of the service's CPU per batch went to the framework around it: Flask's
request context, URL matching and hooks, flask-openapi3's view wrapper, werkzeug's request and
response objects. This path does only what the route needs, with the same code underneath (the
signed principal, ``validate_batch_json``, ``events.apply_batch``, the request id, the request
metrics); like services/reservations/fastpath.py.

It takes only batches that are well-formed for the route: an operator principal whose signature
verifies, an ``application/json`` body of a stated length of at most 1 MiB whose every event is
valid. Anything else goes, body included, to the Flask route, which answers as it always has
(401/403, 400, 413, 415, 422, and the per-index ``invalid`` rejections), so the answers a client
can get are the Flask route's. An error in applying the batch is answered by the app's own error
handlers.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from flask import Flask

from services.common.auth import PRINCIPAL_HEADER, SIGNATURE_HEADER, verify
from services.common.errors import PROBLEM_JSON, Problem
from services.common.leanpath import LeanRoute, app_error, logged_as, request_id
from services.ingestion.events import apply_batch
from services.ingestion.schemas import validate_batch_json

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
PATH = "/v1/events"
_PRINCIPAL = "HTTP_" + PRINCIPAL_HEADER.upper().replace("-", "_")
_SIGNATURE = "HTTP_" + SIGNATURE_HEADER.upper().replace("-", "_")


class FastEvents:
    """WSGI middleware: applies well-formed ``POST /v1/events``, hands the rest to ``app``."""

    def __init__(self, app: Flask, wsgi_app: WSGIApp, *, max_body: int) -> None:
        settings = app.config["PARKING_SETTINGS"]
        self.app = app
        self.wsgi_app = wsgi_app
        self.max_body = max_body
        self.limit = settings.max_events_per_batch
        self.secret = settings.internal_secret.get_secret_value().encode()
        self.lean = LeanRoute.of(app, "events.post_events", "POST")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        accepted = self._accept(environ)
        if accepted is None:
            return self.wsgi_app(environ, start_response)
        operator_id, events = accepted
        rid = request_id(environ)
        with logged_as(rid):
            answer = self._apply(environ, operator_id, events)
        return self.lean.respond(start_response, answer, rid=rid, started=started)

    def _accept(self, environ: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
        """(operator id, events) of a well-formed batch, else None (with the body, if read, put
        back for the Flask route)."""
        principal = verify(self.secret, environ.get(_PRINCIPAL), environ.get(_SIGNATURE))
        if principal is None or principal.role != "operator":
            return None
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        length = environ.get("CONTENT_LENGTH", "")
        if mimetype != "application/json" or not length.isdigit() or int(length) > self.max_body:
            return None
        data = environ["wsgi.input"].read(int(length))
        events = validate_batch_json(data, self.limit)
        if events is None:
            environ["wsgi.input"] = io.BytesIO(data)
            return None
        return principal.id, events

    def _apply(
        self, environ: dict[str, Any], operator_id: str, events: list[dict[str, Any]]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            answer = apply_batch(
                self.app, operator_id=operator_id, events=events, index=None, rejected=[]
            )
        except Problem as exc:
            body = orjson.dumps(exc.body())
            headers = [("Content-Type", PROBLEM_JSON), ("Content-Length", str(len(body)))]
            return exc.status, [*headers, *exc.headers.items()], body
        except Exception as exc:  # the app's error handlers answer (503 for an outage, ...)
            return app_error(self.app, environ, exc)
        body = orjson.dumps(answer)
        return 200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body
