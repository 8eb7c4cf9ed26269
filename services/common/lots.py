"""The lot as every service sees it: validation models and opening-hours logic."""

from __future__ import annotations

import re
from datetime import datetime, time
from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

SpaceType = Literal["standard", "ev", "accessible", "motorcycle"]
Money = Annotated[
    Decimal,
    Field(ge=0, le=Decimal("100000"), max_digits=9, decimal_places=2),
    WithJsonSchema(
        {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,4})(\.[0-9]{1,2})?$", "examples": ["5.00"]}
    ),
]
_HOURS = re.compile(r"^(?:24/7|([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d))$")


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Space(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:/-]+$")
    type: SpaceType = "standard"


class Tariff(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = Field("CNY", pattern=r"^[A-Z]{3}$")
    per_hour: Money
    free_minutes: int = Field(0, ge=0, le=1440)
    daily_max: Money | None = None


def validate_opening_hours(value: str) -> str:
    if not _HOURS.match(value):
        raise ValueError("use '24/7' or 'HH:MM-HH:MM' (local time; may wrap past midnight)")
    return value


def is_open(opening_hours: str, timezone: str, at: datetime) -> bool:
    """Whether a lot with ``opening_hours`` is open at the instant ``at``."""
    if opening_hours == "24/7":
        return True
    m = _HOURS.match(opening_hours)
    if m is None:
        return True
    local = at.astimezone(ZoneInfo(timezone)).time()
    start = time(int(m.group(1)), int(m.group(2)))
    end_h, end_m = int(m.group(3)), int(m.group(4))
    end = time(23, 59, 59, 999999) if end_h == 24 else time(end_h, end_m)
    if start <= end:
        return start <= local < end
    return local >= start or local < end


class LotIn(BaseModel):
    """A lot as an operator registers it (API.md, Lots)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    location: Location
    district: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    address: str | None = Field(None, max_length=500)
    opening_hours: str = Field("24/7", max_length=32)
    timezone: str = Field("Asia/Shanghai", max_length=64)
    spaces: list[Space] | None = Field(None, min_length=1, max_length=5000)
    capacity: dict[SpaceType, Annotated[int, Field(ge=0, le=100_000)]] | None = None
    reservable: dict[SpaceType, Annotated[int, Field(ge=0, le=100_000)]] = Field(
        default_factory=dict
    )
    tariff: Tariff

    _hours = field_validator("opening_hours")(validate_opening_hours)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone") from None
        return value

    @model_validator(mode="after")
    def _one_counting(self) -> LotIn:
        if (self.spaces is None) == (self.capacity is None):
            raise ValueError("give exactly one of 'spaces' or 'capacity'")
        if self.spaces is not None:
            ids = [s.id for s in self.spaces]
            if len(set(ids)) != len(ids):
                raise ValueError("space ids must be unique within the lot")
        if self.capacity is not None and not any(self.capacity.values()):
            raise ValueError("capacity must hold at least one space")
        capacity = self.total_capacity()
        for space_type, n in self.reservable.items():
            if n > capacity.get(space_type, 0):
                raise ValueError(f"reservable[{space_type}] exceeds its capacity")
        return self

    @property
    def counting(self) -> str:
        return "spaces" if self.spaces is not None else "gates"

    def total_capacity(self) -> dict[str, int]:
        if self.spaces is not None:
            counts: dict[str, int] = {}
            for space in self.spaces:
                counts[space.type] = counts.get(space.type, 0) + 1
            return counts
        return {t: n for t, n in (self.capacity or {}).items()}
