"""Driver routes: accounts and tokens, quotes, reservations. Parse, call, serialize."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Response
from flask_openapi3 import APIBlueprint, Tag

from services.common.app import get_db, get_redis, json_response, request_json, settings_of
from services.common.auth import current_principal, require
from services.common.errors import PROBLEM_JSON, Problem
from services.reservations import accounts, booking
from services.reservations.lifecycle import forget_reserved
from services.reservations.schemas import (
    DriverIn,
    DriverOut,
    IdempotencyHeader,
    ListQuery,
    LotPath,
    ProblemOut,
    QuoteOut,
    QuoteQuery,
    ReservationIn,
    ReservationList,
    ReservationOut,
    ReservationPath,
    TokenIn,
    TokenOut,
)

accounts_bp = APIBlueprint("accounts", __name__, url_prefix="/v1", abp_tags=[Tag(name="drivers")])
quotes_bp = APIBlueprint(
    "quotes", __name__, url_prefix="/v1/lots", abp_tags=[Tag(name="reservations")]
)
bp = APIBlueprint(
    "reservations",
    __name__,
    url_prefix="/v1/reservations",
    abp_tags=[Tag(name="reservations")],
    abp_security=[{"driverToken": []}],
)
MAX_KEY_LENGTH = 255


def _conflict(description: str) -> dict[str, Any]:
    """A documented 409: problem+json (the gateway documents the other problem codes)."""
    schema = {"$ref": "#/components/schemas/ProblemOut"}
    return {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}


def _driver_id() -> str:
    """The calling driver's id (the gateway verified the token and passes its subject)."""
    driver_id = booking.parse_uuid(current_principal().id)
    if driver_id is None:
        raise Problem(401, "the credential is not valid", code="unauthorized")
    return driver_id


def _answer(answer: booking.Answer) -> Response:
    """An answer that may be replayed: keys sorted, so a replay is byte for byte the first."""
    resp = Response(
        orjson.dumps(answer.body, option=orjson.OPT_SORT_KEYS),
        status=answer.status,
        mimetype=PROBLEM_JSON if answer.status >= 400 else "application/json",
    )
    if answer.replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


# Accounts -------------------------------------------------------------------------------------


@accounts_bp.post(
    "/drivers",
    responses={201: DriverOut, 409: _conflict("the email is taken"), 422: ProblemOut},
)
def sign_up(body: DriverIn) -> Response:
    """Create a driver account (409 if the email is taken)."""
    with get_db().connection() as conn:
        driver = accounts.sign_up(conn, email=body.email, password=body.password)
    return json_response(driver, 201)


@accounts_bp.post("/auth/token", responses={200: TokenOut, 401: ProblemOut, 422: ProblemOut})
def issue_access_token(body: TokenIn) -> Response:
    """Exchange a driver's email and password for a short-lived access token."""
    with get_db().connection() as conn:
        driver_id = accounts.authenticate(conn, email=body.email.strip(), password=body.password)
    return json_response(accounts.token_for(settings_of(), driver_id))


# Quotes ---------------------------------------------------------------------------------------


@quotes_bp.get("/<lot_id>/quote", responses={200: QuoteOut, 404: ProblemOut, 422: ProblemOut})
def quote(path: LotPath, query: QuoteQuery) -> Response:
    """The price of a window at a lot, and whether it could be reserved now."""
    with get_db().connection() as conn:
        result = booking.quote(
            conn,
            settings=settings_of(),
            lot_id=path.lot_id,
            space_type=query.space_type,
            start=query.start,
            end=query.end,
            now=datetime.now(UTC),
        )
    body = {"price": result.price.as_json(), "available": result.available}
    if result.reason:
        body["reason"] = result.reason
    return json_response(body)


# Reservations ---------------------------------------------------------------------------------


@bp.post(
    "",
    responses={
        201: ReservationOut,
        400: ProblemOut,
        404: ProblemOut,
        409: _conflict("no-capacity, or reservation-limit (the driver's open reservations)"),
        422: ProblemOut,
    },
)
@require("driver")
def create(body: ReservationIn, header: IdempotencyHeader) -> Response:
    """Reserve a space of a type for a window (header ``Idempotency-Key`` required)."""
    key = header.idempotency_key
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Problem(
            400, "send an Idempotency-Key header of 1 to 255 characters", code="bad-request"
        )
    driver_id = _driver_id()
    with get_db().connection() as conn:
        answer = booking.reserve(
            conn,
            settings=settings_of(),
            driver_id=driver_id,
            key=key,
            raw_body=request_json(),
            request=body,
            now=datetime.now(UTC),
        )
    forget_reserved(get_redis(), answer.lot_ids)
    return _answer(answer)


@bp.get("", responses={200: ReservationList})
@require("driver")
def list_mine(query: ListQuery) -> Response:
    """The calling driver's reservations, newest first."""
    with get_db().connection() as conn:
        page = booking.list_mine(
            conn, driver_id=_driver_id(), limit=query.limit, cursor=query.cursor
        )
    return json_response(page)


@bp.get("/<reservation_id>", responses={200: ReservationOut, 404: ProblemOut})
@require("driver")
def get_one(path: ReservationPath) -> Response:
    """One of the calling driver's reservations (404 for another driver's)."""
    with get_db().connection() as conn:
        view = booking.get(conn, driver_id=_driver_id(), reservation_id=path.reservation_id)
    return json_response(view)


@bp.post(
    "/<reservation_id>/cancel",
    responses={200: ReservationOut, 404: ProblemOut, 409: _conflict("not confirmed")},
)
@require("driver")
def cancel(path: ReservationPath) -> Response:
    """Cancel a confirmed reservation; its space is free for others at once."""
    with get_db().connection() as conn:
        answer = booking.cancel(conn, driver_id=_driver_id(), reservation_id=path.reservation_id)
    forget_reserved(get_redis(), answer.lot_ids)
    return _answer(answer)
