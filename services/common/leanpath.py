"""What every service's lean WSGI path (``services/*/fastpath.py``) shares with the Flask app:
the request id (and its log context), the app's own error handlers, the request metrics and the
status line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from services.common import logs
from services.common.app import _REQUEST_ID_OK, REQUEST_ID_HEADER, new_request_id
from services.common.metrics import observe_request

StartResponse = Callable[..., Any]
Answer = tuple[int, list[tuple[str, str]], bytes]


def request_id(environ: dict[str, Any]) -> str:
    """The caller's X-Request-ID if sane, else a new one (as the Flask hook does)."""
    rid = environ.get("HTTP_X_REQUEST_ID", "")
    return rid if _REQUEST_ID_OK.match(rid) else new_request_id()


def app_error(app: Flask, environ: dict[str, Any], exc: Exception) -> Answer:
    """The answer the app's error handlers give for ``exc`` (503 for an outage, ...)."""
    with app.request_context(environ):
        response = app.make_response(app.handle_user_exception(exc))
        return response.status_code, list(response.headers.items()), response.get_data()


class logged_as:
    """Log lines written inside carry the request id ``rid``, as the Flask hook arranges."""

    __slots__ = ("rid", "token")

    def __init__(self, rid: str) -> None:
        self.rid = rid

    def __enter__(self) -> None:
        self.token = logs.request_id_var.set(self.rid)

    def __exit__(self, *exc: object) -> None:
        logs.request_id_var.reset(self.token)


@dataclass(frozen=True, slots=True)
class LeanRoute:
    """The Flask route a lean path answers for: its answers are counted under the same
    service, method and route pattern as the route's own."""

    service: str
    method: str
    route: str

    @classmethod
    def of(cls, app: Flask, endpoint: str, method: str) -> LeanRoute:
        rule = next(r.rule for r in app.url_map.iter_rules() if r.endpoint == endpoint)
        return cls(app.config["PARKING_SETTINGS"].service_name, method, rule)

    def respond(
        self, start_response: StartResponse, answer: Answer, *, rid: str, started: float
    ) -> list[bytes]:
        """Send ``answer`` with its request id and count it in the request metrics."""
        status, headers, body = answer
        headers.append((REQUEST_ID_HEADER, rid))
        observe_request(self.service, self.method, self.route, status, started)
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}", headers)
        return [body]
