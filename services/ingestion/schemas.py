"""Request and response shapes of the ingestion API (API.md, Lots and Events).

Events are validated as typed dicts, not models, so a batch of 1000 costs about a millisecond:
the view parses the body with orjson and hands the list to :func:`validate_events`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from services.common.lots import Location, Space, SpaceType, Tariff

# No control characters: PostgreSQL text cannot hold NUL, and ids are shown in logs.
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
EventId = Annotated[str, Field(min_length=1, max_length=128, pattern=_PRINTABLE)]
LotId = Annotated[
    str,
    Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
]
SpaceId = Annotated[str, Field(min_length=1, max_length=64, pattern=_PRINTABLE)]
Plate = Annotated[str, Field(min_length=1, max_length=32, pattern=_PRINTABLE)]
Count = Annotated[int, Field(ge=0, le=100_000)]
_STRICT = ConfigDict(extra="forbid")


class SpaceEvent(TypedDict):
    """A space sensor saw its space become occupied or free."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: EventId
    lot_id: LotId
    type: Literal["space"]
    space_id: SpaceId
    occupied: StrictBool
    observed_at: AwareDatetime


class GateEvent(TypedDict):
    """A car entered or left a lot counted at its gates (``space_type`` defaults to standard)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: EventId
    lot_id: LotId
    type: Literal["entry", "exit"]
    space_type: NotRequired[SpaceType]
    observed_at: AwareDatetime
    plate: NotRequired[Plate]


class CountEvent(TypedDict):
    """The lot's own system counted the cars inside, per space type."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: EventId
    lot_id: LotId
    type: Literal["count"]
    occupied: Annotated[dict[SpaceType, Count], Field(min_length=1)]
    observed_at: AwareDatetime


Event = Annotated[SpaceEvent | GateEvent | CountEvent, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)
_EVENTS = TypeAdapter(list[Event])


class _Batch(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    events: list[Event]


_BATCH = TypeAdapter(_Batch)


def validate_batch_json(body: bytes, limit: int) -> list[dict[str, Any]] | None:
    """Every event of a wholly valid batch of at most ``limit``, parsed straight from JSON.

    The common case, in one pass of pydantic-core over the bytes; None when anything is off,
    and the caller takes the slow path that names each problem.
    """
    try:
        events: list[dict[str, Any]] = _BATCH.validate_json(body)["events"]  # type: ignore[assignment]
    except ValidationError:
        return None
    if not events or len(events) > limit:
        return None
    return events


def validate_events(
    raw: list[Any],
) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]]]:
    """Split ``raw`` into (index, valid event) pairs and per-index ``invalid`` rejections."""
    try:
        events: list[dict[str, Any]] = _EVENTS.validate_python(raw)  # type: ignore[assignment]
        return list(enumerate(events)), []
    except ValidationError:
        pass  # some are bad: validate one by one to name them
    valid: list[tuple[int, dict[str, Any]]] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        try:
            event = _EVENT.validate_python(item)
        except ValidationError as exc:
            rejected.append({"index": index, "code": "invalid", "detail": _describe(exc)})
            continue
        valid.append((index, dict(event)))
    return valid, rejected


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


# Documentation models: the OpenAPI document describes the body with these, while the view
# parses it itself (orjson + the typed dicts above) for speed.


_EVENT_ITEM: dict[str, Any] = {
    "description": "One event, validated on its own (an item that matches none of these shapes"
    " is counted in `rejected` with code `invalid`, and the others are still applied):"
    " `{id, lot_id, type: space, space_id, occupied: bool, observed_at}`,"
    " `{id, lot_id, type: entry, space_type, observed_at, plate?}`,"
    " `{id, lot_id, type: exit, space_type, observed_at}`,"
    " `{id, lot_id, type: count, occupied: {space_type: n}, observed_at}`;"
    " `id` is unique per operator, `observed_at` RFC 3339 with offset.",
}


class EventBatch(BaseModel):
    """1 to 1000 events (API.md, Events); at most 1 MiB."""

    model_config = ConfigDict(extra="forbid")
    events: list[Any] = Field(
        min_length=1,
        max_length=1000,
        json_schema_extra={"items": _EVENT_ITEM},  # type: ignore[dict-item]
    )


class Rejection(BaseModel):
    index: int
    code: str = Field(description="invalid, unknown-lot, unknown-space, unknown-space-type, ...")
    detail: str


class EventBatchResult(BaseModel):
    """Each event of the batch is counted in exactly one of the four."""

    accepted: int
    duplicate: int
    stale: int
    rejected: list[Rejection]


class LotPath(BaseModel):
    lot_id: str


class MineQuery(BaseModel):
    mine: str | None = Field(None, description="1: the calling operator's lots")
    limit: int = Field(100, ge=1, le=500)
    cursor: str | None = Field(None, max_length=64)


class LotPatch(BaseModel):
    """The fields to change; the lot stays valid as a whole (LotIn's rules)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    location: Location | None = None
    district: str | None = None
    address: str | None = None
    opening_hours: str | None = None
    timezone: str | None = None
    spaces: list[Space] | None = None
    capacity: dict[SpaceType, int] | None = None
    reservable: dict[SpaceType, int] | None = None
    tariff: Tariff | None = None


class LotOut(BaseModel):
    """A lot as its operator sees it."""

    id: str
    name: str
    location: Location
    district: str
    address: str | None
    opening_hours: str
    timezone: str
    capacity: dict[str, int]
    reservable: dict[str, int]
    tariff: dict[str, Any]
    spaces: list[dict[str, Any]] | None = None
    occupied: dict[str, int] | None = Field(None, description="live count per space type")
    live_updated_at: datetime | None = Field(None, description="the latest accepted event")
    updated_at: datetime
    created_at: datetime


class LotList(BaseModel):
    items: list[LotOut]
    next_cursor: str | None
