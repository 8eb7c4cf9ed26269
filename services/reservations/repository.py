"""Repository functions of the reservations service: plain SQL, one job each."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _json(obj: Any) -> Jsonb:
    """A jsonb parameter serialized by orjson (several per booking: it is on the hot path)."""
    return Jsonb(obj, dumps=_dumps)


RESERVATION_COLUMNS = (
    "id, driver_id, lot_id, space_type, starts_at, ends_at, status, price_amount,"
    " price_currency, created_at, arrived_at, departed_at, cancelled_at"
)


def advisory_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (a collision only serializes more)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# Drivers --------------------------------------------------------------------------------------


def create_driver(
    conn: psycopg.Connection[Any], *, email: str, password_hash: str
) -> dict[str, Any] | None:
    """Insert a driver; None if the email (case-insensitively) is taken."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO drivers (email, password_hash) VALUES (%s, %s)"
            " ON CONFLICT ((lower(email))) DO NOTHING RETURNING id, email",
            (email, password_hash),
        )
        return cur.fetchone()


def driver_credentials(conn: psycopg.Connection[Any], *, email: str) -> tuple[str, str] | None:
    """(driver id, password hash) of the driver with ``email``, or None."""
    row = conn.execute(
        "SELECT id::text, password_hash FROM drivers WHERE lower(email) = lower(%s)", (email,)
    ).fetchone()
    return (row[0], row[1]) if row else None


def set_password_hash(conn: psycopg.Connection[Any], *, driver_id: str, password_hash: str) -> None:
    """Replace a driver's password hash (after a parameter upgrade)."""
    conn.execute("UPDATE drivers SET password_hash = %s WHERE id = %s", (password_hash, driver_id))


# Lots -----------------------------------------------------------------------------------------


def lot_for_booking(conn: psycopg.Connection[Any], *, lot_id: str) -> dict[str, Any] | None:
    """What booking needs of a live lot: hours, time zone, quotas and tariff; None if unknown."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, opening_hours, timezone, reservable, tariff FROM lots"
            " WHERE id = %s AND deleted_at IS NULL",
            (lot_id,),
        )
        return cur.fetchone()


def lot_for_booking_text(conn: psycopg.Connection[Any], *, lot_id: str) -> tuple[Any, ...] | None:
    """(opening hours, time zone, tariff as jsonb text) of a live lot, or None: what a booking
    is priced and checked by, in the form ``reserve_space_checked`` compares with the row."""
    return conn.execute(
        "SELECT opening_hours, timezone, tariff::text FROM lots"
        " WHERE id = %s AND deleted_at IS NULL",
        (lot_id,),
    ).fetchone()


# Idempotency keys -----------------------------------------------------------------------------


def answer_once(
    conn: psycopg.Connection[Any],
    *,
    driver_id: str,
    key: str,
    request_hash: bytes,
    status: int,
    response: Any,
) -> tuple[bytes, int | None, Any, bool]:
    """Store ``response`` under a new key; if the key exists, its stored answer instead.

    Returns (request hash, status, response, replayed).
    """
    row = conn.execute(
        "INSERT INTO idempotency_keys (driver_id, key, request_hash, status, response)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
        (driver_id, key, request_hash, status, _json(response)),
    ).fetchone()
    if row is not None:
        return request_hash, status, response, False
    # A new statement: it sees the row of a concurrent holder the INSERT waited for.
    stored = stored_answer(conn, driver_id=driver_id, key=key)
    if stored is None:
        return request_hash, None, None, True
    return stored[0], stored[1], stored[2], True


def stored_answer(
    conn: psycopg.Connection[Any], *, driver_id: str, key: str
) -> tuple[bytes, int | None, Any] | None:
    """(request hash, status, response body) stored under the key, or None."""
    row = conn.execute(
        "SELECT request_hash, status, response FROM idempotency_keys"
        " WHERE driver_id = %s AND key = %s",
        (driver_id, key),
    ).fetchone()
    return (bytes(row[0]), row[1], row[2]) if row else None


def delete_idempotency_keys(conn: psycopg.Connection[Any], *, older_than: timedelta) -> int:
    """Delete keys created more than ``older_than`` ago; return how many."""
    cur = conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - %s::interval", (older_than,)
    )
    return cur.rowcount


# Reservations ---------------------------------------------------------------------------------


def quota_and_peak(
    conn: psycopg.Connection[Any], *, lot_id: str, space_type: str, start: datetime, end: datetime
) -> tuple[int, int]:
    """(quota, most confirmed reservations at one instant of the window): no locks, a look.

    The peak is the ``reservations_peak`` SQL function's, the same ``reserve_space`` decides by.
    """
    row = conn.execute(
        "SELECT (SELECT coalesce((reservable ->> %(type)s)::int, 0) FROM lots WHERE id = %(lot)s),"
        " reservations_peak(%(lot)s, %(type)s, %(start)s, %(end)s)",
        {"start": start, "end": end, "lot": lot_id, "type": space_type},
    ).fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1])


def reserve_space(
    conn: psycopg.Connection[Any],
    *,
    reservation: dict[str, Any],
    plate_hash: bytes,
    idempotency_key: str,
    request_hash: bytes,
    max_open: int,
    answers: dict[str, Any],
) -> tuple[bytes, int | None, Any, bool]:
    """Claim the key, lock, check capacity and the driver's cap, insert: one call of the
    ``reserve_space`` function (migrations 0301-0303), so one round trip and one transaction.

    ``answers`` holds the bodies to store: ``created``, ``no_capacity`` and ``limit``.
    Returns (request hash, status, response, replayed).
    """
    r = reservation
    row = conn.execute(
        "SELECT status, response, request_hash, replayed FROM reserve_space("
        "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            r["driver_id"],
            idempotency_key,
            request_hash,
            advisory_key("reservations-driver", str(r["driver_id"])),
            advisory_key("reservations-quota", str(r["lot_id"]), r["space_type"]),
            r["id"],
            r["lot_id"],
            r["space_type"],
            r["starts_at"],
            r["ends_at"],
            plate_hash,
            r["price_amount"],
            r["price_currency"],
            r["created_at"],
            max_open,
            _json(answers["created"]),
            _json(answers["no_capacity"]),
            _json(answers["limit"]),
        ),
    ).fetchone()
    if row is None:  # the key vanished (cleaned up) between the claim and the read
        return request_hash, None, None, True
    return bytes(row[2]), row[0], row[1], bool(row[3])


class LotChanged(Exception):
    """The lot's registry entry changed (or the lot went) since the caller read it."""


LOT_CHANGED = "PR409"  # the SQLSTATE reserve_space_checked raises for that (migration 0304)


def reserve_space_checked(
    conn: psycopg.Connection[Any],
    *,
    reservation: dict[str, Any],
    plate_hash: bytes,
    idempotency_key: str,
    request_hash: bytes,
    max_open: int,
    answers: dict[str, Any],
    lot: tuple[str, str, str],
) -> tuple[bytes, int | None, Any, bool]:
    """``reserve_space``, checking inside the transaction that the lot's (opening hours, time
    zone, tariff text) are still ``lot``: raises LotChanged (and nothing is written) if not.

    One call of the ``reserve_space_checked`` function (migration 0304): the only statement of
    a booking, so the lot may come from a cache. Returns (request hash, status, response,
    replayed).
    """
    r = reservation
    try:
        row = conn.execute(
            "SELECT status, response, request_hash, replayed FROM reserve_space_checked("
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                r["driver_id"],
                idempotency_key,
                request_hash,
                advisory_key("reservations-driver", str(r["driver_id"])),
                advisory_key("reservations-quota", str(r["lot_id"]), r["space_type"]),
                r["id"],
                r["lot_id"],
                r["space_type"],
                r["starts_at"],
                r["ends_at"],
                plate_hash,
                r["price_amount"],
                r["price_currency"],
                r["created_at"],
                max_open,
                _json(answers["created"]),
                _json(answers["no_capacity"]),
                _json(answers["limit"]),
                *lot,
            ),
        ).fetchone()
    except psycopg.Error as exc:
        if exc.sqlstate == LOT_CHANGED:
            raise LotChanged(str(r["lot_id"])) from None
        raise
    if row is None:  # the key vanished (cleaned up) between the claim and the read
        return request_hash, None, None, True
    return bytes(row[2]), row[0], row[1], bool(row[3])


def get_reservation(
    conn: psycopg.Connection[Any], *, reservation_id: str, driver_id: str
) -> dict[str, Any] | None:
    """The driver's reservation, or None (also when it belongs to another driver)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE id = %s AND driver_id = %s",
            (reservation_id, driver_id),
        )
        return cur.fetchone()


def list_reservations(
    conn: psycopg.Connection[Any],
    *,
    driver_id: str,
    limit: int,
    before: tuple[datetime, str] | None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` of the driver's reservations, newest first, after the cursor ``before``."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE driver_id = %s"
            " AND (%s::timestamptz IS NULL OR (created_at, id) < (%s::timestamptz, %s::uuid))"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            (
                driver_id,
                before[0] if before else None,
                before[0] if before else None,
                before[1] if before else None,
                limit,
            ),
        )
        return cur.fetchall()


def cancel_reservation(
    conn: psycopg.Connection[Any], *, reservation_id: str, driver_id: str
) -> dict[str, Any] | None:
    """Cancel the driver's confirmed reservation; None if there is no such confirmed one."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "UPDATE reservations SET status = 'cancelled', cancelled_at = now()"
            " WHERE id = %s AND driver_id = %s AND status = 'confirmed'"
            f" RETURNING {RESERVATION_COLUMNS}",
            (reservation_id, driver_id),
        )
        return cur.fetchone()


def mark_no_shows(conn: psycopg.Connection[Any], *, grace: timedelta) -> list[str]:
    """Mark confirmed reservations unarrived by start + grace (or by their end) as no-shows.

    Rows locked by a concurrent change (a gate event's arrival, a cancel) are skipped, not
    waited for: the next run sees how that change ended. Returns the lot id of every
    reservation changed.
    """
    rows = conn.execute(
        "UPDATE reservations SET status = 'no_show' WHERE id IN ("
        " SELECT id FROM reservations"
        " WHERE status = 'confirmed' AND starts_at <= now()"
        " AND (starts_at <= now() - %s::interval OR ends_at <= now())"
        " FOR UPDATE SKIP LOCKED)"
        " AND status = 'confirmed'"
        " RETURNING lot_id::text",
        (grace,),
    ).fetchall()
    return [r[0] for r in rows]
