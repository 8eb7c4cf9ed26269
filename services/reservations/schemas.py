"""Request and response models of the reservations service (they make its OpenAPI document)."""

from __future__ import annotations

import copy
import functools
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from services.common.lots import SpaceType
from services.reservations import domain


def _instant(value: datetime) -> datetime:
    """An aware instant in UTC, within years 2000..8999 (beyond, date arithmetic overflows)."""
    try:
        at = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range") from None
    if not EARLIEST <= at < domain.LATEST:
        raise ValueError("out of range")
    return at


EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


class DriverIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=8, max_length=256)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        value = value.strip()
        if not domain.is_valid_email(value):
            raise ValueError("not an email address")
        return value


class DriverOut(BaseModel):
    id: str
    email: str


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=1, max_length=254)
    password: str = Field(min_length=1, max_length=256)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if domain.has_control_characters(value):
            raise ValueError("not an email address")
        return value.strip()


class TokenOut(BaseModel):
    access_token: str
    token_type: str = Field(description="always Bearer")
    expires_in: int


class ReservationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lot_id: str = Field(min_length=1, max_length=64)
    space_type: SpaceType
    start: AwareDatetime
    end: AwareDatetime
    plate: str = Field(min_length=1, max_length=16)

    _instants = field_validator("start", "end")(_instant)

    @field_validator("plate")
    @classmethod
    def _plate(cls, value: str) -> str:
        if not domain.is_valid_plate(value):
            raise ValueError("1 to 16 letters, digits, spaces or dashes")
        return value


class IdempotencyHeader(BaseModel):
    idempotency_key: str | None = Field(
        None,
        alias="Idempotency-Key",
        description="required: 1 to 255 characters, unique per request the driver means once",
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Cached (flask-openapi3 asks for it on every request), and documenting the header as
        required: the model lets a missing key through only so the view can answer 400."""
        schema = copy.deepcopy(_schema_of(cls, args, tuple(sorted(kwargs.items()))))
        schema["properties"]["Idempotency-Key"] = {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "description": "unique per request the driver means once; replays answer the same",
        }
        schema["required"] = ["Idempotency-Key"]
        return schema


@functools.lru_cache(maxsize=8)
def _schema_of(
    cls: type[BaseModel], args: tuple[Any, ...], kwargs: tuple[tuple[str, Any], ...]
) -> dict[str, Any]:
    return BaseModel.model_json_schema.__func__(cls, *args, **dict(kwargs))  # type: ignore[attr-defined, no-any-return]


class PriceOut(BaseModel):
    amount: str = Field(description="decimal string")
    currency: str


class ReservationOut(BaseModel):
    id: str
    status: str = Field(description="confirmed | active | completed | cancelled | no_show")
    lot_id: str
    space_type: str
    start: str
    end: str
    price: PriceOut
    created_at: str
    arrived_at: str | None = None
    departed_at: str | None = None
    cancelled_at: str | None = None


class ReservationList(BaseModel):
    items: list[ReservationOut]
    next_cursor: str | None


class ReservationPath(BaseModel):
    reservation_id: str = Field(max_length=64)


class ListQuery(BaseModel):
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=200)


class LotPath(BaseModel):
    lot_id: str = Field(max_length=64)


class QuoteQuery(BaseModel):
    space_type: SpaceType
    start: AwareDatetime
    end: AwareDatetime

    _instants = field_validator("start", "end")(_instant)


class QuoteOut(BaseModel):
    price: PriceOut
    available: bool
    reason: str | None = Field(
        None, description="why not available: closed | not-reservable | no-capacity"
    )


class ErrorItem(BaseModel):
    loc: list[str]
    msg: str


class ProblemOut(BaseModel):
    """application/problem+json (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(
        description="validation | not-found | no-capacity | reservation-limit"
        " | idempotency-key-reused | unauthorized | conflict | bad-request"
    )
    errors: list[ErrorItem] | None = None
