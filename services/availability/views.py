"""Public availability routes: nearby search, lot detail, history and change streams.

The search's query string is validated here with pydantic (422 problem+json on bad input) rather
than by flask-openapi3's query hook, which rebuilds the model's JSON schema on every request; its
parameters are still documented in the OpenAPI document.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from flask import Flask, Response, current_app, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.availability import repository, stream
from services.availability.domain import EARLIEST, LATEST, decode_cursor, encode_cursor
from services.availability.readpath import NearbyQuery, Page, ReadPath
from services.common.app import json_response
from services.common.errors import Problem, not_found, validation_problem
from services.common.lots import SpaceType

bp = APIBlueprint(
    "availability", __name__, url_prefix="/v1/lots", abp_tags=[Tag(name="availability")]
)

RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:?\d{2})$"
)
INTERVAL_SPAN = {"1m": timedelta(days=2), "15m": timedelta(days=31), "1h": timedelta(days=366)}
INTERVAL_DEFAULT_SPAN = {
    "1m": timedelta(hours=1),
    "15m": timedelta(days=1),
    "1h": timedelta(days=7),
}


class LotIdPath(BaseModel):
    lot_id: str = Field(max_length=64)


class NearbyParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lat: float = Field(ge=-90, le=90, description="latitude of the point, WGS84")
    lon: float = Field(ge=-180, le=180, description="longitude of the point, WGS84")
    radius_m: float = Field(1000, gt=0, le=50000, description="search radius in metres")
    space_type: SpaceType | None = Field(None, description="count free spaces of this type only")
    min_free: int = Field(
        1,
        ge=0,
        le=100_000,
        description="at least this many free spaces (0: every lot, even closed)",
    )
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200, description="next_cursor of the last page")


class HistoryParams(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    start: datetime | None = Field(None, alias="from", description="RFC 3339 with offset")
    end: datetime | None = Field(None, alias="to", description="RFC 3339 with offset; default now")
    interval: Literal["1m", "15m", "1h"] = "15m"

    @field_validator("start", "end", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str) or not RFC3339.match(value):
            raise ValueError("give an RFC 3339 time with a time zone offset")
        return value

    @field_validator("start", "end")
    @classmethod
    def _bounded(cls, value: datetime | None) -> datetime | None:
        if value is not None and not EARLIEST <= value <= LATEST:
            raise ValueError("give a time between 2000 and 2100")
        return value


class Position(BaseModel):
    lat: float
    lon: float


class LotAvailability(BaseModel):
    """A lot's live availability (API.md, Availability)."""

    id: str
    name: str
    location: Position
    district: str
    address: str | None
    opening_hours: str
    capacity: dict[str, int]
    occupied: dict[str, int]
    reserved: dict[str, int] = Field(description="confirmed reservations covering now")
    free: dict[str, int] = Field(description="capacity - occupied - reserved, never negative")
    free_total: int
    status: Literal["open", "almost_full", "full", "closed", "unknown"]
    updated_at: datetime | None = Field(description="observed time of the latest event")
    tariff: dict[str, Any]


class NearbyLotAvailability(LotAvailability):
    distance_m: float


class NearbyPage(BaseModel):
    items: list[NearbyLotAvailability]
    next_cursor: str | None


class HistoryBucket(BaseModel):
    bucket: datetime
    occupied_avg: float
    occupied_max: int
    capacity: int
    entries: int
    exits: int


class LotHistory(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    lot_id: str
    interval: Literal["1m", "15m", "1h"]
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    series: list[HistoryBucket]


def _parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters of ``model``."""
    params: list[dict[str, Any]] = []
    schema = model.model_json_schema(by_alias=True)
    for name, prop in schema.get("properties", {}).items():
        params.append(
            {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", []),
                "description": prop.pop("description", ""),
                "schema": prop,
            }
        )
    return params


def _parse(model: type[BaseModel], args: dict[str, str]) -> Any:
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise validation_problem(exc, prefix=("query",)) from None


def readpath() -> ReadPath:
    rp: ReadPath = current_app.extensions["availability"]
    return rp


def _lot_id(raw: str) -> str:
    """The canonical lot id; anything that is not a UUID names no lot (404)."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise not_found("lot") from None


@bp.get(
    "",
    summary="Lots near a point with free spaces, nearest first",
    responses={200: NearbyPage},
    openapi_extensions={"parameters": _parameters(NearbyParams)},
)
def nearby() -> Response:
    """Lot views with ``distance_m``; ``next_cursor`` pages on (null on the last page)."""
    params: NearbyParams = _parse(NearbyParams, request.args.to_dict())
    try:
        query = nearby_query(params)
    except ValueError as exc:
        raise Problem(
            422,
            "the request is not valid",
            code="validation",
            errors=[{"loc": ["query", "cursor"], "msg": str(exc)}],
        ) from None
    return json_response(nearby_page(readpath().nearby(query, datetime.now(UTC))))


def nearby_query(params: NearbyParams) -> NearbyQuery:
    """The search ``params`` ask for; ValueError if their cursor is not one of ours."""
    return NearbyQuery(
        lat=params.lat,
        lon=params.lon,
        radius_m=params.radius_m,
        space_type=params.space_type,
        min_free=params.min_free,
        limit=params.limit,
        after=decode_cursor(params.cursor) if params.cursor else None,
    )


def nearby_page(page: Page) -> dict[str, Any]:
    """The answer's body for ``page``."""
    cursor = encode_cursor(*page.next_after) if page.next_after else None
    return {"items": page.items, "next_cursor": cursor}


@bp.get(
    "/<lot_id>",
    summary="A lot's capacity, occupancy, reservations and free spaces",
    responses={200: LotAvailability},
)
def lot_detail(path: LotIdPath) -> Response:
    """Live counts per space type, ``free_total``, ``status`` and ``updated_at``."""
    found = readpath().detail(_lot_id(path.lot_id), datetime.now(UTC))
    if found is None:
        raise not_found("lot")
    return json_response(found[1])


@bp.get(
    "/<lot_id>/history",
    summary="A lot's occupancy over time, from the worker's rollups",
    responses={200: LotHistory},
)
def lot_history(path: LotIdPath, query: HistoryParams) -> Response:
    """Buckets in [from, to) of 1m (at most 2 days), 15m (31 days) or 1h (366 days)."""
    lot_id = _lot_id(path.lot_id)
    params = query
    end = (params.end or datetime.now(UTC)).astimezone(UTC)
    start = (params.start or end - INTERVAL_DEFAULT_SPAN[params.interval]).astimezone(UTC)
    errors = []
    if start >= end:
        errors.append({"loc": ["query", "from"], "msg": "must be before 'to'"})
    elif end - start > INTERVAL_SPAN[params.interval]:
        days = INTERVAL_SPAN[params.interval].days
        errors.append(
            {"loc": ["query", "from"], "msg": f"{params.interval} buckets span {days} days at most"}
        )
    if errors:
        raise Problem(422, "the request is not valid", code="validation", errors=errors)
    with readpath().db.connection() as conn:
        if not repository.lot_exists(conn, lot_id=lot_id):
            raise not_found("lot")
        rows = repository.history(
            conn, lot_id=lot_id, interval=params.interval, start=start, end=end
        )
    return json_response(
        {
            "lot_id": lot_id,
            "interval": params.interval,
            "from": start,
            "to": end,
            "series": [
                {
                    "bucket": r["bucket"].astimezone(UTC),
                    "occupied_avg": r["occupied_avg"],
                    "occupied_max": r["occupied_max"],
                    "capacity": r["capacity"],
                    "entries": r["entries"],
                    "exits": r["exits"],
                }
                for r in rows
            ],
        }
    )


@bp.get(
    "/<lot_id>/stream",
    summary="Server-sent events: one per change of the lot",
    responses={200: {"description": "text/event-stream; each event's id is the lot's version"}},
)
def lot_stream(path: LotIdPath) -> Response:
    """``event: lot`` with the lot's view on each change; send ``Last-Event-ID`` to resume."""
    lot_id = _lot_id(path.lot_id)
    hub: stream.Hub = current_app.extensions["availability_hub"]
    hub.ensure_started()
    sub = hub.subscribe(lot_id)  # before reading, so no change falls in between
    try:
        current = readpath().detail(lot_id, datetime.now(UTC))
    except BaseException:
        hub.unsubscribe(sub)
        raise
    if current is None:
        hub.unsubscribe(sub)
        raise not_found("lot")
    last = stream.parse_last_event_id(request.headers.get("Last-Event-ID"))
    response = Response(
        stream.events(hub, sub, current, last),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(lambda: hub.unsubscribe(sub))
    return response


def init_app(app: Flask) -> None:
    """Register the routes (the benchmark floor is answered by services.availability.fastpath)."""
    app.register_api(bp)  # type: ignore[attr-defined]
