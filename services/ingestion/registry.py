"""Repository functions for the lot registry, and its copy in Redis."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import psycopg
import redis
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.common import livestate
from services.common.lots import LotIn

# Present while Redis holds the whole registry; a Redis that restarted empty lacks it.
SYNCED_KEY = "livestate:synced"

LOT_COLUMNS = (
    "l.id, l.operator_id, l.name, l.district, l.address, l.lat, l.lon, l.opening_hours,"
    " l.timezone, l.counting, l.capacity, l.reservable, l.tariff, l.created_at, l.updated_at"
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_uuid(value: str) -> bool:
    return _UUID.match(value) is not None


def create_lot(conn: psycopg.Connection[Any], *, operator_id: str, lot: LotIn) -> dict[str, Any]:
    """Insert a lot with its spaces and zeroed occupancy; return it as the API shows it."""
    capacity = lot.total_capacity()
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO lots (operator_id, name, district, address, lat, lon, opening_hours,"
            " timezone, counting, capacity, reservable, tariff)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                operator_id,
                lot.name,
                lot.district,
                lot.address,
                lot.location.lat,
                lot.location.lon,
                lot.opening_hours,
                lot.timezone,
                lot.counting,
                Jsonb(capacity),
                Jsonb(lot.reservable),
                Jsonb(lot.tariff.model_dump(mode="json")),
            ),
        )
        row = cur.fetchone()
        assert row is not None
        lot_id = row["id"]
        if lot.spaces:
            _insert_spaces(cur, lot_id=str(lot_id), lot=lot)
        cur.executemany(
            "INSERT INTO lot_occupancy (lot_id, space_type, capacity) VALUES (%s, %s, %s)",
            [(lot_id, t, n) for t, n in sorted(capacity.items())],
        )
        cur.execute("INSERT INTO lot_live (lot_id, version) VALUES (%s, 1)", (lot_id,))
    found = get_lot(conn, lot_id=str(lot_id))
    assert found is not None
    return found


def _insert_spaces(cur: psycopg.Cursor[Any], *, lot_id: str, lot: LotIn) -> None:
    """Insert the lot's spaces; a space already there keeps its state and takes the new type."""
    assert lot.spaces is not None
    cur.execute(
        "INSERT INTO spaces (lot_id, space_id, space_type)"
        " SELECT %s, s, t FROM unnest(%s::text[], %s::text[]) AS u(s, t)"
        " ON CONFLICT (lot_id, space_id) DO UPDATE SET space_type = EXCLUDED.space_type",
        (lot_id, [s.id for s in lot.spaces], [s.type for s in lot.spaces]),
    )


def get_lot(
    conn: psycopg.Connection[Any],
    *,
    lot_id: str,
    operator_id: str | None = None,
    with_state: bool = False,
) -> dict[str, Any] | None:
    """A live lot (of ``operator_id`` if given) as the API shows it, or None.

    ``with_state`` adds the owner's view of the live state: occupied per type, updated_at,
    and each space's state.
    """
    if not is_uuid(lot_id):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {LOT_COLUMNS} FROM lots l WHERE l.id = %s AND l.deleted_at IS NULL"
            " AND (%s::uuid IS NULL OR l.operator_id = %s::uuid)",
            (lot_id, operator_id, operator_id),
        )
        row = cur.fetchone()
        if row is None:
            return None
        spaces = None
        if row["counting"] == "spaces":
            cur.execute(
                "SELECT space_id, space_type, occupied, observed_at FROM spaces"
                " WHERE lot_id = %s ORDER BY space_id",
                (row["id"],),
            )
            spaces = [
                {"id": s["space_id"], "type": s["space_type"]}
                | (
                    {"occupied": s["occupied"], "observed_at": s["observed_at"]}
                    if with_state
                    else {}
                )
                for s in cur.fetchall()
            ]
        view = lot_view(row, spaces)
        if with_state:
            cur.execute(
                "SELECT o.space_type, o.occupied, lv.updated_at FROM lot_occupancy o"
                " JOIN lot_live lv ON lv.lot_id = o.lot_id WHERE o.lot_id = %s",
                (row["id"],),
            )
            states = cur.fetchall()
            view["occupied"] = {s["space_type"]: s["occupied"] for s in states}
            view["live_updated_at"] = states[0]["updated_at"] if states else None
    return view


def list_lots(
    conn: psycopg.Connection[Any], *, operator_id: str, limit: int, after: str | None = None
) -> list[dict[str, Any]]:
    """The operator's live lots ordered by id, after the id ``after`` (a page cursor)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {LOT_COLUMNS} FROM lots l WHERE l.operator_id = %s AND l.deleted_at IS NULL"
            " AND (%s::uuid IS NULL OR l.id > %s::uuid) ORDER BY l.id LIMIT %s",
            (operator_id, after, after, limit),
        )
        return [lot_view(row, None) for row in cur.fetchall()]


def lock_lot(conn: psycopg.Connection[Any], *, lot_id: str, operator_id: str) -> bool:
    """Lock a lot of ``operator_id`` against concurrent event batches; False if there is none.

    Call inside a transaction. The lot's ``lot_live`` row is the lock every writer of its
    counts takes first; the deleted check runs after the lock, on a fresh snapshot.
    """
    if not is_uuid(lot_id):
        return False
    locked = conn.execute(
        "SELECT 1 FROM lot_live lv JOIN lots l ON l.id = lv.lot_id"
        " WHERE lv.lot_id = %s AND l.operator_id = %s FOR NO KEY UPDATE OF lv",
        (lot_id, operator_id),
    ).fetchone()
    if locked is None:
        return False
    live = conn.execute(
        "SELECT 1 FROM lots WHERE id = %s AND deleted_at IS NULL", (lot_id,)
    ).fetchone()
    return live is not None


def update_lot(conn: psycopg.Connection[Any], *, lot_id: str, operator_id: str, lot: LotIn) -> bool:
    """Replace a lot's registry fields with ``lot`` (its counting unchanged); False if missing.

    Spaces that stay keep their state, new ones start free, removed ones go; occupancy is
    recounted (space lots) or re-clamped to the new capacity (gate lots), and the live version
    is bumped so Redis takes the new state.
    """
    capacity = lot.total_capacity()
    with conn.transaction(), conn.cursor() as cur:
        if not lock_lot(conn, lot_id=lot_id, operator_id=operator_id):
            return False
        cur.execute(
            "UPDATE lots SET name = %s, district = %s, address = %s, lat = %s, lon = %s,"
            " opening_hours = %s, timezone = %s, capacity = %s, reservable = %s, tariff = %s,"
            " updated_at = now() WHERE id = %s",
            (
                lot.name,
                lot.district,
                lot.address,
                lot.location.lat,
                lot.location.lon,
                lot.opening_hours,
                lot.timezone,
                Jsonb(capacity),
                Jsonb(lot.reservable),
                Jsonb(lot.tariff.model_dump(mode="json")),
                lot_id,
            ),
        )
        types = sorted(capacity)
        cur.execute(
            "DELETE FROM lot_occupancy WHERE lot_id = %s AND space_type <> ALL(%s::text[])",
            (lot_id, types),
        )
        if lot.spaces is not None:
            cur.execute(
                "DELETE FROM spaces WHERE lot_id = %s AND space_id <> ALL(%s::text[])",
                (lot_id, [s.id for s in lot.spaces]),
            )
            _insert_spaces(cur, lot_id=lot_id, lot=lot)
            cur.execute(
                "INSERT INTO lot_occupancy (lot_id, space_type, capacity, occupied)"
                " SELECT lot_id, space_type, count(*), count(*) FILTER (WHERE occupied)"
                " FROM spaces WHERE lot_id = %s GROUP BY lot_id, space_type"
                " ON CONFLICT (lot_id, space_type) DO UPDATE"
                " SET capacity = EXCLUDED.capacity, occupied = EXCLUDED.occupied",
                (lot_id,),
            )
        else:
            cur.execute(
                "INSERT INTO lot_occupancy (lot_id, space_type, capacity)"
                " SELECT %s, t, n FROM unnest(%s::text[], %s::int[]) AS u(t, n)"
                " ON CONFLICT (lot_id, space_type) DO UPDATE SET capacity = EXCLUDED.capacity,"
                " snapshot_occupied = least(lot_occupancy.snapshot_occupied, EXCLUDED.capacity),"
                " occupied = least(greatest(least(lot_occupancy.snapshot_occupied,"
                " EXCLUDED.capacity) + lot_occupancy.gate_delta, 0), EXCLUDED.capacity)",
                (lot_id, types, [capacity[t] for t in types]),
            )
        cur.execute("UPDATE lot_live SET version = version + 1 WHERE lot_id = %s", (lot_id,))
    return True


def delete_lot(conn: psycopg.Connection[Any], *, lot_id: str, operator_id: str) -> bool:
    """Retire a lot of ``operator_id`` (kept for its history); False if there is none."""
    with conn.transaction():
        if not lock_lot(conn, lot_id=lot_id, operator_id=operator_id):
            return False
        conn.execute(
            "UPDATE lots SET deleted_at = now(), updated_at = now() WHERE id = %s", (lot_id,)
        )
        conn.execute("UPDATE lot_live SET version = version + 1 WHERE lot_id = %s", (lot_id,))
    return True


def lot_view(row: dict[str, Any], spaces: list[dict[str, Any]] | None) -> dict[str, Any]:
    view = {
        "id": str(row["id"]),
        "name": row["name"],
        "location": {"lat": row["lat"], "lon": row["lon"]},
        "district": row["district"],
        "address": row["address"],
        "opening_hours": row["opening_hours"],
        "timezone": row["timezone"],
        "capacity": row["capacity"],
        "reservable": row["reservable"],
        "tariff": row["tariff"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if spaces is not None:
        view["spaces"] = spaces
    return view


def lot_in_of(view: dict[str, Any]) -> dict[str, Any]:
    """The registry fields of a lot view, as a LotIn body (to merge a patch into)."""
    body = {
        k: view[k]
        for k in (
            "name",
            "location",
            "district",
            "address",
            "opening_hours",
            "timezone",
            "reservable",
            "tariff",
        )
    }
    if "spaces" in view:
        body["spaces"] = [{"id": s["id"], "type": s["type"]} for s in view["spaces"]]
    else:
        body["capacity"] = view["capacity"]
    return body


def meta_of(view: dict[str, Any]) -> dict[str, Any]:
    """The registry summary the availability service reads from Redis."""
    return {
        k: view[k]
        for k in (
            "id",
            "name",
            "location",
            "district",
            "address",
            "opening_hours",
            "timezone",
            "capacity",
            "reservable",
            "tariff",
        )
    }


def live_states(
    conn: psycopg.Connection[Any], *, lot_ids: list[str] | None = None
) -> list[livestate.LotState]:
    """The committed live state of ``lot_ids`` (every live lot if None), for Redis."""
    rows = conn.execute(
        "SELECT l.id::text, lv.version, lv.updated_at, l.district,"
        " jsonb_object_agg(o.space_type, o.occupied), jsonb_object_agg(o.space_type, o.capacity)"
        " FROM lots l JOIN lot_live lv ON lv.lot_id = l.id"
        " JOIN lot_occupancy o ON o.lot_id = l.id"
        " WHERE l.deleted_at IS NULL AND (%s::uuid[] IS NULL OR l.id = ANY(%s::uuid[]))"
        " GROUP BY l.id, lv.version, lv.updated_at, l.district",
        (lot_ids, lot_ids),
    ).fetchall()
    return [
        livestate.LotState(
            lot_id=r[0],
            version=int(r[1]),
            updated_at=r[2].isoformat() if r[2] else None,
            district=r[3],
            occupied=r[4],
            capacity=r[5],
        )
        for r in rows
    ]


def sync_lots_to_redis(
    conn: psycopg.Connection[Any], client: redis.Redis, *, lot_ids: list[str] | None = None
) -> int:
    """Write registry summaries and live states of ``lot_ids`` (all if None) to Redis."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {LOT_COLUMNS} FROM lots l WHERE l.deleted_at IS NULL"
            " AND (%s::uuid[] IS NULL OR l.id = ANY(%s::uuid[]))",
            (lot_ids, lot_ids),
        )
        rows = cur.fetchall()
    pipe = client.pipeline(transaction=False)
    for row in rows:
        meta = meta_of(lot_view(row, None))
        pipe.set(livestate.meta_key(meta["id"]), orjson.dumps(meta, default=str))
        pipe.geoadd(livestate.GEO_KEY, (row["lon"], row["lat"], meta["id"]))
    if rows:
        pipe.execute()
    livestate.apply_states(client, live_states(conn, lot_ids=lot_ids))
    return len(rows)


def resync(conn: psycopg.Connection[Any], client: redis.Redis, *, lot_ids: list[str]) -> int:
    """Bring ``lot_ids`` in Redis in line with PostgreSQL: write live ones, remove retired ones."""
    rows = conn.execute(
        "SELECT id::text, deleted_at IS NOT NULL FROM lots WHERE id = ANY(%s::uuid[])",
        (lot_ids,),
    ).fetchall()
    retired = [r[0] for r in rows if r[1]]
    live = [r[0] for r in rows if not r[1]]
    for lot_id in retired:
        livestate.remove_lot(client, lot_id)
    if live:
        sync_lots_to_redis(conn, client, lot_ids=live)
    return len(rows)


def sync_all(conn: psycopg.Connection[Any], client: redis.Redis) -> int:
    """Write every live lot to Redis, then mark Redis as holding the whole registry."""
    count = sync_lots_to_redis(conn, client)
    client.set(SYNCED_KEY, str(int(time.time())))
    return count


def rebuild_cache(conn: psycopg.Connection[Any], client: redis.Redis) -> int:
    """Drop every live-state key and write them again from PostgreSQL."""
    livestate.flush(client)
    return sync_all(conn, client)
