"""A copy of Redis' geo index in the availability worker, to answer a search's GEOSEARCH.

At 100,000 lots GEOSEARCH was most of Redis' work for a search (213 us a call in the
benchmark against 92 at 10,000: it scans every member of the geohash cells around its radius,
and where the radius falls just past a cell boundary those cells are four times the circle).
This index answers the same question in the worker: the ``count`` members nearest a point
within a radius, with their distances, from the positions Redis holds (decoded from the
members' geohash scores as Redis decodes them), bucketed in a grid sized so that a cell holds a
few lots wherever they are dense. A search takes it only while Redis vouches for it (see
``readpath._Vouched``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from services.availability.domain import EARTH_RADIUS_M, bounding_box

# Redis' geohash: 26 bits of latitude (even bits) and 26 of longitude (odd bits), 52 in all,
# over these ranges (src/geohash.h)
_STEP = 26
_LAT_MIN, _LAT_MAX = -85.05112878, 85.05112878
_LON_MIN, _LON_MAX = -180.0, 180.0

_PER_CELL = 4.0  # lots per non-empty cell the grid aims at
_MAX_CELLS = 400  # a search's box over more cells than this is left to Redis


def _even_bits(x: int) -> int:
    """The even bits of a 52-bit integer, packed (the inverse of spreading them)."""
    x &= 0x5555555555555555
    x = (x | (x >> 1)) & 0x3333333333333333
    x = (x | (x >> 2)) & 0x0F0F0F0F0F0F0F0F
    x = (x | (x >> 4)) & 0x00FF00FF00FF00FF
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFF
    return (x | (x >> 16)) & 0x00000000FFFFFFFF


def decode(score: float) -> tuple[float, float]:
    """(lon, lat) of a geo member's score, as Redis decodes it (the centre of its cell)."""
    bits = int(score)
    lat_cells, lon_cells = _even_bits(bits), _even_bits(bits >> 1)
    scale = 1.0 / (1 << _STEP)
    lat_span, lon_span = _LAT_MAX - _LAT_MIN, _LON_MAX - _LON_MIN
    lat = (
        _LAT_MIN + lat_cells * scale * lat_span + _LAT_MIN + (lat_cells + 1) * scale * lat_span
    ) / 2
    lon = (
        _LON_MIN + lon_cells * scale * lon_span + _LON_MIN + (lon_cells + 1) * scale * lon_span
    ) / 2
    return max(_LON_MIN, min(_LON_MAX, lon)), max(_LAT_MIN, min(_LAT_MAX, lat))


def _unit(lon: float, lat: float) -> tuple[float, float, float]:
    phi, lam = math.radians(lat), math.radians(lon)
    return math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi)


class GeoIndex:
    """Members and their positions in a grid of ``cell_deg``-degree latitude rows and
    ``cell_deg / cos(lat0)``-degree longitude columns (``lat0`` the members' median
    latitude), each cell a tuple of (member, x, y, z) with the position as a unit vector:
    the great-circle distance is ``2 R asin(chord / 2)``, and the chord orders members as the
    distance does without a trigonometric call per member."""

    def __init__(self, cells: dict[tuple[int, int], tuple[Any, ...]], cell_lat: float,
                 cell_lon: float, size: int) -> None:  # fmt: skip
        self._cells = cells
        self._cell_lat = cell_lat
        self._cell_lon = cell_lon
        self.size = size

    @classmethod
    def build(cls, positions: Sequence[tuple[str, float, float]]) -> GeoIndex:
        """The index of (member, lon, lat) positions."""
        if not positions:
            return cls({}, 1.0, 1.0, 0)
        lats = sorted(p[2] for p in positions)
        lat0 = lats[len(lats) // 2]
        cos0 = max(0.05, math.cos(math.radians(lat0)))
        # a first guess from the members' extent, then one correction from how full the
        # non-empty cells came out (lots cluster: the extent overstates the spread)
        lons = sorted(p[1] for p in positions)
        height = max(1e-6, lats[-1] - lats[0])
        width = max(1e-6, (lons[-1] - lons[0]) * cos0)
        cell = math.sqrt(height * width * _PER_CELL / len(positions))
        for _ in range(2):
            counts: dict[tuple[int, int], int] = {}
            for _, lon, lat in positions:
                key = (math.floor(lat / cell), math.floor(lon * cos0 / cell))
                counts[key] = counts.get(key, 0) + 1
            mean = len(positions) / len(counts)
            cell *= math.sqrt(_PER_CELL / mean)
        cells: dict[tuple[int, int], list[Any]] = {}
        for member, lon, lat in positions:
            key = (math.floor(lat / cell), math.floor(lon * cos0 / cell))
            cells.setdefault(key, []).append((member, *_unit(lon, lat)))
        flat = {key: tuple(values) for key, values in cells.items()}
        return cls(flat, cell, cell / cos0, len(positions))

    def nearest(
        self, lon: float, lat: float, radius: float, count: int, first: float
    ) -> list[list[Any]] | None:
        """As ``readpath.nearest`` asks of GEOSEARCH: the ``count`` members nearest (lon, lat)
        within ``radius`` metres, nearest first, as [member, distance] (fewer: all within),
        trying from ``first`` and doubling; None when a box to scan spans too many cells or
        the antimeridian (Redis answers those)."""
        qx, qy, qz = _unit(lon, lat)
        r = min(radius, first)
        for _ in range(64):
            found = self._within(lon, lat, qx, qy, qz, r)
            if found is None:
                return None
            if len(found) >= count or r >= radius:
                found.sort()
                return [
                    [member, 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(c2) / 2.0))]
                    for c2, member in found[:count]
                ]
            r = min(radius, r * 2)
        return None

    def _within(
        self, lon: float, lat: float, qx: float, qy: float, qz: float, r: float
    ) -> list[tuple[float, str]] | None:
        min_lon, min_lat, max_lon, max_lat = bounding_box(lat, lon, r)
        if max_lon - min_lon >= 360.0:
            return None
        rows = range(math.floor(min_lat / self._cell_lat), math.floor(max_lat / self._cell_lat) + 1)
        col0 = math.floor(min_lon / self._cell_lon)
        cols = range(col0, math.floor(max_lon / self._cell_lon) + 1)
        if len(rows) * len(cols) > _MAX_CELLS:
            return None
        # the chord of ``r`` (with a hair's slack: the distances are recomputed exactly)
        limit = (2.0 * math.sin(min(math.pi / 2, r / (2.0 * EARTH_RADIUS_M)))) ** 2 * (1 + 1e-9)
        cells = self._cells
        found: list[tuple[float, str]] = []
        for row in rows:
            for col in cols:
                cell = cells.get((row, col))
                if cell is None:
                    continue
                for member, x, y, z in cell:
                    dx, dy, dz = x - qx, y - qy, z - qz
                    c2 = dx * dx + dy * dy + dz * dz
                    if c2 <= limit:
                        found.append((c2, member))
        return found


def positions(pairs: Iterable[Sequence[Any]]) -> list[tuple[str, float, float]]:
    """(member, lon, lat) of ZRANGE ... WITHSCORES pairs (RESP3: [member, score])."""
    out = []
    for member, score in pairs:
        lon, lat = decode(float(score))
        out.append((member if isinstance(member, str) else member.decode(), lon, lat))
    return out
