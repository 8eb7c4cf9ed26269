"""SQL of the availability service: live lots, nearby candidates, history buckets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from services.availability.domain import EARTH_RADIUS_M, LotData

_LOT_SELECT = """
SELECT l.id::text AS id, l.name, l.district, l.address, l.lat, l.lon, l.opening_hours,
       l.timezone, l.capacity AS registry_capacity, l.reservable, l.tariff,
       lv.version, lv.updated_at, occ.capacity, occ.occupied
FROM lots l
LEFT JOIN lot_live lv ON lv.lot_id = l.id
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(o.space_type, o.capacity) AS capacity,
           jsonb_object_agg(o.space_type, o.occupied) AS occupied
    FROM lot_occupancy o WHERE o.lot_id = l.id
) occ ON true
"""

# Great-circle distance from (%(lat)s, %(lon)s) with Redis GEO's earth radius.
_DISTANCE = (
    f"2 * {EARTH_RADIUS_M} * asin(least(1.0, sqrt("
    "power(sin(radians(l.lat - %(lat)s) / 2), 2)"
    " + cos(radians(%(lat)s)) * cos(radians(l.lat)) * power(sin(radians(l.lon - %(lon)s) / 2), 2)"
    ")))"
)


def lot_data(row: Mapping[str, Any]) -> LotData:
    capacity = row["capacity"] if row["capacity"] is not None else row["registry_capacity"]
    return LotData(
        id=row["id"],
        name=row["name"],
        lat=row["lat"],
        lon=row["lon"],
        district=row["district"],
        address=row["address"],
        opening_hours=row["opening_hours"],
        timezone=row["timezone"],
        tariff=row["tariff"],
        capacity=capacity,
        occupied=row["occupied"] or {},
        version=int(row["version"] or 0),
        updated_at=row["updated_at"],
    )


def live_lots(conn: psycopg.Connection[Any], *, lot_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The live (not deleted) lots among ``lot_ids`` with their live counts."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _LOT_SELECT + " WHERE l.id = ANY(%s::uuid[]) AND l.deleted_at IS NULL",
            (list(lot_ids),),
        )
        return cur.fetchall()


def live_lots_page(
    conn: psycopg.Connection[Any], *, after: str | None, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` live lots with ids above ``after``, in id order (for a full refill)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _LOT_SELECT + " WHERE l.deleted_at IS NULL AND (%s::uuid IS NULL OR l.id > %s::uuid)"
            " ORDER BY l.id LIMIT %s",
            (after, after, limit),
        )
        return cur.fetchall()


def nearby_lots(
    conn: psycopg.Connection[Any],
    *,
    lat: float,
    lon: float,
    radius_m: float,
    box: tuple[float, float, float, float],
    min_distance_m: float,
    limit: int,
) -> list[dict[str, Any]]:
    """Live lots within ``radius_m`` (and ``box``), nearest first, from ``min_distance_m`` on."""
    params = {
        "lat": lat,
        "lon": lon,
        "radius": radius_m,
        "min_d": min_distance_m,
        "limit": limit,
        "x1": box[0],
        "y1": box[1],
        "x2": box[2],
        "y2": box[3],
    }
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "WITH near AS ("
            f" SELECT l.id, {_DISTANCE} AS distance FROM lots l"
            " WHERE l.deleted_at IS NULL"
            " AND point(l.lon, l.lat) <@ box(point(%(x1)s, %(y1)s), point(%(x2)s, %(y2)s))"
            "), ranked AS ("
            " SELECT id, distance FROM near WHERE distance <= %(radius)s AND distance >= %(min_d)s"
            " ORDER BY distance, id LIMIT %(limit)s"
            f") {_LOT_SELECT} JOIN ranked r ON r.id = l.id ORDER BY r.distance, l.id",
            params,
        )
        return cur.fetchall()


def deleted_among(conn: psycopg.Connection[Any], *, lot_ids: Sequence[str]) -> list[str]:
    """The ids among ``lot_ids`` that are deleted or do not exist."""
    if not lot_ids:
        return []
    rows = conn.execute(
        "SELECT i::text FROM unnest(%s::uuid[]) AS i"
        " WHERE NOT EXISTS (SELECT 1 FROM lots l WHERE l.id = i AND l.deleted_at IS NULL)",
        (list(lot_ids),),
    ).fetchall()
    return [r[0] for r in rows]


def deleted_since(conn: psycopg.Connection[Any], *, since: datetime) -> list[str]:
    """Lots deleted at or after ``since``."""
    rows = conn.execute("SELECT id::text FROM lots WHERE deleted_at >= %s", (since,)).fetchall()
    return [r[0] for r in rows]


def lot_exists(conn: psycopg.Connection[Any], *, lot_id: str) -> bool:
    """Whether ``lot_id`` is a live lot."""
    row = conn.execute(
        "SELECT 1 FROM lots WHERE id = %s::uuid AND deleted_at IS NULL", (lot_id,)
    ).fetchone()
    return row is not None


def history(
    conn: psycopg.Connection[Any], *, lot_id: str, interval: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """The lot's rollup buckets of ``interval`` in [start, end), oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT bucket, occupied_avg, occupied_max, capacity, entries, exits"
            " FROM occupancy_buckets"
            " WHERE level = 'lot' AND key = %s AND interval = %s"
            " AND bucket >= %s AND bucket < %s ORDER BY bucket",
            (lot_id, interval, start, end),
        )
        return cur.fetchall()
