"""problem+json (RFC 9457) for every error a client can see, registered on every app."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
import psycopg
import psycopg_pool
import redis
from flask import Flask, Response
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("parking.errors")

CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    411: "length-required",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation",
    429: "rate-limited",
    500: "internal",
    502: "bad-gateway",
    503: "unavailable",
    504: "upstream-timeout",
}


class Problem(Exception):
    """An error answered as problem+json."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        code: str | None = None,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or CODES.get(status, "error")
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://parking.example/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def response(self) -> Response:
        resp = Response(orjson.dumps(self.body()), status=self.status, mimetype=PROBLEM_JSON)
        for name, value in self.headers.items():
            resp.headers[name] = value
        return resp


def not_found(what: str = "resource") -> Problem:
    return Problem(404, f"{what} not found", code="not-found")


def validation_problem(exc: ValidationError, *, prefix: tuple[str, ...] = ()) -> Problem:
    """A 422 listing every pydantic error by location, without echoing input values."""
    errors = [
        {"loc": [*prefix, *(str(p) for p in err["loc"])], "msg": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return Problem(422, "the request is not valid", code="validation", errors=errors)


def register_error_handlers(app: Flask) -> None:
    """Map every exception to problem+json; database and Redis outages become 503."""

    @app.errorhandler(Problem)
    def _problem(exc: Problem) -> Response:
        return exc.response()

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return validation_problem(exc).response()

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = {
            404: "no such route",
            405: "method not allowed on this route",
            413: "request body too large",
        }.get(status, exc.description or HTTPStatus(status).phrase)
        problem = Problem(status, detail)
        resp = problem.response()
        if status == 405 and exc.get_response().headers.get("Allow"):
            resp.headers["Allow"] = exc.get_response().headers["Allow"]
        return resp

    @app.errorhandler(psycopg.errors.UniqueViolation)
    def _conflict(exc: psycopg.errors.UniqueViolation) -> Response:
        return Problem(409, "conflicts with an existing resource", code="conflict").response()

    @app.errorhandler(psycopg.errors.QueryCanceled)
    def _db_timeout(exc: Exception) -> Response:
        log.warning("database statement timed out", exc_info=exc)
        return Problem(
            503, "the database is busy, try again", code="unavailable", headers={"Retry-After": "1"}
        ).response()

    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(psycopg_pool.PoolTimeout)
    def _db_down(exc: Exception) -> Response:
        log.error("database unavailable: %s", type(exc).__name__)
        return Problem(
            503, "the database is unavailable", code="unavailable", headers={"Retry-After": "1"}
        ).response()

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def _redis_down(exc: Exception) -> Response:
        log.error("redis unavailable: %s", type(exc).__name__)
        return Problem(
            503, "a dependency is unavailable", code="unavailable", headers={"Retry-After": "1"}
        ).response()

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return Problem(500, "internal error", code="internal").response()
