"""What a lot looks like to a driver: free spaces, status, distance, and search cursors.

Pure functions over :class:`LotData`, which the Redis path and the PostgreSQL path both build,
so the two paths give byte-for-byte the same answers.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from services.common.lots import is_open

# Times a client may name: outside these, datetime arithmetic would overflow (a 422, not a 500).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)

# The radius Redis GEO uses, so distances from either path agree with the geo index.
EARTH_RADIUS_M = 6372797.560856
# Redis stores positions as 52-bit geohashes (sub-metre error): search it with this margin and
# compute exact distances from the registry's coordinates.
GEO_MARGIN_M = 5.0


class LotData(NamedTuple):
    """A live lot: registry summary plus live counts (capacity and occupied per type).

    A tuple of strings, numbers and flat dicts, so the garbage collector stops tracking it: a
    read path caching many lots then costs no longer collections (see ``readpath._Lots``)."""

    id: str
    name: str
    lat: float
    lon: float
    district: str
    address: str | None
    opening_hours: str
    timezone: str
    tariff: Any
    capacity: Mapping[str, int]
    occupied: Mapping[str, int]
    version: int
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class Thresholds:
    unknown_after_s: float
    almost_full_ratio: float


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def status_of(
    lot: LotData,
    capacity: int,
    used: int,
    now: datetime,
    thresholds: Thresholds,
) -> str:
    """open, almost_full, full, closed (outside opening hours) or unknown (no recent data)."""
    return status_at(
        lot.opening_hours, lot.timezone, lot.updated_at, capacity, used, now, thresholds
    )


def status_at(
    opening_hours: str,
    timezone: str,
    updated_at: datetime | None,
    capacity: int,
    used: int,
    now: datetime,
    thresholds: Thresholds,
) -> str:
    """``status_of`` a lot of these opening hours, time zone and latest data."""
    if not is_open(opening_hours, timezone, now):
        return "closed"
    if updated_at is None or (now - updated_at).total_seconds() > thresholds.unknown_after_s:
        return "unknown"
    if capacity <= 0 or used >= capacity:
        return "full"
    if used >= thresholds.almost_full_ratio * capacity:
        return "almost_full"
    return "open"


def usage(lot: LotData, reserved: Mapping[str, int]) -> tuple[int, int]:
    """(spaces, spaces taken: occupied or reserved, at most each type's capacity), the counts
    a lot's status is judged by."""
    total = used = 0
    for t, cap in lot.capacity.items():
        total += int(cap)
        used += min(int(cap), int(lot.occupied.get(t, 0)) + int(reserved.get(t, 0)))
    return total, used


def lot_view(
    lot: LotData, reserved: Mapping[str, int], now: datetime, thresholds: Thresholds
) -> dict[str, Any]:
    """The lot as ``GET /v1/lots/{id}`` shows it (API.md, Availability)."""
    types = sorted(lot.capacity)
    capacity = {t: int(lot.capacity[t]) for t in types}
    occupied = {t: int(lot.occupied.get(t, 0)) for t in types}
    held = {t: int(reserved.get(t, 0)) for t in types}
    free = {t: max(0, capacity[t] - occupied[t] - held[t]) for t in types}
    total, used = usage(lot, reserved)
    return {
        "id": lot.id,
        "name": lot.name,
        "location": {"lat": lot.lat, "lon": lot.lon},
        "district": lot.district,
        "address": lot.address,
        "opening_hours": lot.opening_hours,
        "capacity": capacity,
        "occupied": occupied,
        "reserved": held,
        "free": free,
        "free_total": sum(free.values()),
        "status": status_of(lot, total, used, now, thresholds),
        "updated_at": utc(lot.updated_at),
        "tariff": lot.tariff,
    }


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres, as Redis GEO computes it."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dlat = p2 - p1
    dlon = math.radians(lon2 - lon1)
    a = math.sin(dlat / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lon: float, radius_m: float) -> tuple[float, float, float, float]:
    """(min_lon, min_lat, max_lon, max_lat) holding every point within ``radius_m``."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    min_lat, max_lat = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    cos_lat = min(math.cos(math.radians(min_lat)), math.cos(math.radians(max_lat)))
    if cos_lat <= 1e-9 or max_lat >= 90.0 or min_lat <= -90.0:
        return -180.0, min_lat, 180.0, max_lat
    dlon = math.degrees(radius_m / (EARTH_RADIUS_M * cos_lat))
    if dlon >= 180.0 or lon - dlon < -180.0 or lon + dlon > 180.0:
        return -180.0, min_lat, 180.0, max_lat  # wraps the antimeridian: scan every longitude
    return lon - dlon, min_lat, lon + dlon, max_lat


def free_spaces(lot: LotData, reserved: Mapping[str, int], space_type: str | None) -> int:
    """Free spaces of ``space_type`` (of every type if None), as ``lot_view`` counts them."""
    types = (space_type,) if space_type else lot.capacity
    free = 0
    for t in types:
        left = lot.capacity.get(t, 0) - lot.occupied.get(t, 0) - reserved.get(t, 0)
        if left > 0:
            free += left
    return free


def matches(
    lot: LotData,
    reserved: Mapping[str, int],
    space_type: str | None,
    min_free: int,
    now: datetime,
) -> bool:
    """Whether a lot answers "where can I park now": enough free spaces, and open."""
    if min_free <= 0:
        return True
    if free_spaces(lot, reserved, space_type) < min_free:
        return False
    return is_open(lot.opening_hours, lot.timezone, now)


def encode_cursor(distance: float, lot_id: str) -> str:
    raw = orjson.dumps({"d": distance, "i": lot_id})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (distance, lot id) a cursor resumes after; ValueError if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = orjson.loads(raw)
        distance, lot_id = float(data["d"]), str(data["i"])
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError("not a cursor from this API") from None
    if not math.isfinite(distance) or distance < 0 or len(lot_id) > 64:
        raise ValueError("not a cursor from this API")
    return distance, lot_id
