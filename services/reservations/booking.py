"""Reserving, quoting and cancelling: the repository's SQL under the domain's rules.

A reservation is made in one PostgreSQL transaction, the call of the ``reserve_space_checked``
function (migrations 0301_reserve_space.sql to 0304), after Python has priced the window and
checked it (length, not past, opening hours) against the lot's registry entry, which it keeps
in memory (:class:`LotCache`):

1. claim the idempotency key (insert its row; a concurrent request with the same key waits
   there until the first commits, then replays its answer);
2. lock the driver and then the lot's space type (transaction-scoped advisory locks, held
   until commit, so every worker and replica serializes on them);
3. check that the lot's opening hours, time zone and tariff are still those the window was
   priced and checked by (if not, the statement fails and rolls back, the claim too, and the
   booking starts again from the lot's row);
4. measure, with the locks held, the peak of confirmed reservations over the window and the
   driver's open ones; insert only if the peak stays within the quota and the driver under
   the cap;
5. store the answer under the key; commit.

Capacity is thus never a read-then-write across transactions: no two bookings of one lot and
type interleave between step 4 and the commit. Refusals that do not depend on capacity (an
unknown lot, a bad window) are judged on the lot's row and stored under the key too, so a
replay answers the same.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg

from services.common.auth import plate_hash
from services.common.config import ReservationsSettings
from services.common.errors import Problem
from services.common.lots import Tariff
from services.reservations import domain
from services.reservations import repository as repo
from services.reservations.schemas import ReservationIn


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer (success or problem) as stored under an idempotency key."""

    status: int
    body: dict[str, Any]
    lot_ids: list[str] = field(default_factory=list)  # whose cached reserved counts changed
    replayed: bool = False


def parse_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def reservation_view(row: dict[str, Any]) -> dict[str, Any]:
    def at(value: datetime | None) -> str | None:
        return domain.rfc3339(value) if value is not None else None

    return {
        "id": str(row["id"]),
        "status": row["status"],
        "lot_id": str(row["lot_id"]),
        "space_type": row["space_type"],
        "start": domain.rfc3339(row["starts_at"]),
        "end": domain.rfc3339(row["ends_at"]),
        "price": {"amount": str(row["price_amount"]), "currency": row["price_currency"]},
        "created_at": domain.rfc3339(row["created_at"]),
        "arrived_at": at(row["arrived_at"]),
        "departed_at": at(row["departed_at"]),
        "cancelled_at": at(row["cancelled_at"]),
    }


def _window_problem(exc: domain.WindowError) -> Problem:
    return Problem(
        422,
        exc.message,
        code="validation",
        errors=[{"loc": ["body", exc.field], "msg": exc.message}],
    )


def no_capacity() -> Problem:
    return Problem(
        409,
        "no reservable space of this type is free for the whole window",
        code="no-capacity",
    )


@dataclass(frozen=True, slots=True)
class BookingLot:
    """What a booking is priced and checked by: a lot's opening hours, time zone and tariff
    (with the tariff's jsonb text, which ``reserve_space_checked`` compares with the row)."""

    opening_hours: str
    timezone: str
    tariff_text: str
    tariff: Tariff
    read_at: float

    @property
    def checked(self) -> tuple[str, str, str]:
        return self.opening_hours, self.timezone, self.tariff_text


class LotCache:
    """Lots' booking entries by id, kept per process for at most ``ttl_s``.

    Never trusted on its own: a booking made from an entry passes the entry to
    ``reserve_space_checked``, which compares it with the lot's row inside the booking's
    transaction, and a refusal judged on an entry is judged again on the row. So a lot changed
    meanwhile costs one more round trip, never a price from an old tariff.
    """

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lots: dict[str, BookingLot] = {}

    def get(
        self, conn: psycopg.Connection[Any], lot_id: str, *, fresh: bool = False
    ) -> tuple[BookingLot | None, bool]:
        """(the lot's entry or None if there is no such live lot, whether it was read now)."""
        now = time.monotonic()
        if not fresh:
            hit = self._lots.get(lot_id)
            if hit is not None and now - hit.read_at < self.ttl_s:
                return hit, False
        row = repo.lot_for_booking_text(conn, lot_id=lot_id)
        if row is None:
            self._lots.pop(lot_id, None)
            return None, True
        hours, zone, tariff_text = row
        lot = BookingLot(
            hours, zone, tariff_text, Tariff.model_validate(orjson.loads(tariff_text)), now
        )
        if len(self._lots) >= self.max_entries:
            self._lots.clear()
        self._lots[lot_id] = lot
        return lot, True


LOTS = LotCache()
# Reading a lot again because it changed under a booking: a lot edited that often is refused.
MAX_LOT_READS = 3


def reserve(
    conn: psycopg.Connection[Any],
    *,
    settings: ReservationsSettings,
    driver_id: str,
    key: str,
    raw_body: Any,
    request: ReservationIn,
    now: datetime,
    lots: LotCache = LOTS,
) -> Answer:
    """Make (or replay) the reservation ``request`` of ``driver_id`` under idempotency ``key``.

    Usually one statement, the ``reserve_space_checked`` call that claims the key, locks,
    checks the lot is as priced, and checks capacity (see the module doc), with the lot's
    entry from ``lots``; a refusal that does not depend on capacity (an unknown lot, a bad
    window) is judged on the lot's row and stored once under the key.
    """
    request_hash = domain.request_hash(settings.plate_hash_key.get_secret_value(), raw_body)
    lot_id = parse_uuid(request.lot_id)
    fresh = False
    for _ in range(MAX_LOT_READS):
        lot, read_now = lots.get(conn, lot_id, fresh=fresh) if lot_id else (None, True)
        refusal = _refusal(lot, settings=settings, request=request, now=now)
        if refusal is not None or lot is None or lot_id is None:
            if not read_now:  # judged on a cached entry: judge again on the row
                fresh = True
                continue
            problem = refusal or Problem(404, "lot not found", code="not-found")
            stored = repo.answer_once(
                conn,
                driver_id=driver_id,
                key=key,
                request_hash=request_hash,
                status=problem.status,
                response=problem.body(),
            )
            return _answer_of(stored, request_hash)
        try:
            answer = _book(
                conn,
                settings=settings,
                driver_id=driver_id,
                key=key,
                request_hash=request_hash,
                request=request,
                now=now,
                lot_id=lot_id,
                lot=lot,
            )
        except repo.LotChanged:
            fresh = True
            continue
        if answer.status == 201 and not answer.replayed:
            return Answer(201, answer.body, lot_ids=[lot_id])
        return answer
    raise Problem(409, "the lot is being changed, retry", code="conflict")


def _book(
    conn: psycopg.Connection[Any],
    *,
    settings: ReservationsSettings,
    driver_id: str,
    key: str,
    request_hash: bytes,
    request: ReservationIn,
    now: datetime,
    lot_id: str,
    lot: BookingLot,
) -> Answer:
    """Price the window by ``lot`` and book it (raises repo.LotChanged if ``lot`` is stale)."""
    start, end = request.start, request.end
    price = domain.price_of(lot.tariff, start, end)
    reservation = {
        "id": uuid.uuid4(),
        "driver_id": driver_id,
        "lot_id": lot_id,
        "space_type": request.space_type,
        "starts_at": start,
        "ends_at": end,
        "status": "confirmed",
        "price_amount": price.amount,
        "price_currency": price.currency,
        "created_at": now,
        "arrived_at": None,
        "departed_at": None,
        "cancelled_at": None,
    }
    limit = settings.max_open_per_driver
    stored = repo.reserve_space_checked(
        conn,
        reservation=reservation,
        plate_hash=plate_hash(settings.plate_hash_key.get_secret_value(), request.plate),
        idempotency_key=key,
        request_hash=request_hash,
        max_open=limit,
        answers={
            "created": reservation_view(reservation),
            "no_capacity": no_capacity().body(),
            "limit": Problem(
                409,
                f"a driver may hold at most {limit} open reservations",
                code="reservation-limit",
            ).body(),
        },
        lot=lot.checked,
    )
    return _answer_of(stored, request_hash)


def _refusal(
    lot: BookingLot | None,
    *,
    settings: ReservationsSettings,
    request: ReservationIn,
    now: datetime,
) -> Problem | None:
    """Why the window cannot be booked at this lot whatever its capacity, or None."""
    if lot is None:
        return Problem(404, "lot not found", code="not-found")
    try:
        domain.check_window(request.start, request.end, now=now, max_window_h=settings.max_window_h)
    except domain.WindowError as exc:
        return _window_problem(exc)
    if not domain.open_for_window(lot.opening_hours, lot.timezone, request.start, request.end):
        return _window_problem(domain.WindowError("start", "the lot is closed during the window"))
    return None


def _answer_of(stored: tuple[bytes, int | None, Any, bool], request_hash: bytes) -> Answer:
    """The answer to give for what the key holds: ours, a replay, or a reused-key problem."""
    stored_hash, status, body, replayed = stored
    if status is None:
        # The key was cleaned up between the claim and the read: rare enough to ask for a retry.
        raise Problem(409, "the request is in progress, retry", code="conflict")
    if replayed and stored_hash != request_hash:
        raise Problem(
            422,
            "this Idempotency-Key was used with another request body",
            code="idempotency-key-reused",
        )
    return Answer(status, body, replayed=replayed)


@dataclass(frozen=True, slots=True)
class Quote:
    price: domain.Price
    available: bool
    reason: str | None


def quote(
    conn: psycopg.Connection[Any],
    *,
    settings: ReservationsSettings,
    lot_id: str,
    space_type: str,
    start: datetime,
    end: datetime,
    now: datetime,
) -> Quote:
    """Price of the window and whether a reservation would be accepted now (not a hold)."""
    parsed = parse_uuid(lot_id)
    lot = repo.lot_for_booking(conn, lot_id=parsed) if parsed else None
    if lot is None or parsed is None:
        raise Problem(404, "lot not found", code="not-found")
    try:
        domain.check_window(start, end, now=now, max_window_h=settings.max_window_h)
    except domain.WindowError as exc:
        raise Problem(
            422,
            exc.message,
            code="validation",
            errors=[{"loc": ["query", exc.field], "msg": exc.message}],
        ) from None
    price = domain.price_of(Tariff.model_validate(lot["tariff"]), start, end)
    if not domain.open_for_window(lot["opening_hours"], lot["timezone"], start, end):
        return Quote(price, False, "closed")
    quota, peak = repo.quota_and_peak(
        conn, lot_id=parsed, space_type=space_type, start=start, end=end
    )
    if quota <= 0:
        return Quote(price, False, "not-reservable")
    if peak + 1 > quota:
        return Quote(price, False, "no-capacity")
    return Quote(price, True, None)


def cancel(conn: psycopg.Connection[Any], *, driver_id: str, reservation_id: str) -> Answer:
    """Cancel the driver's confirmed reservation: 404 if not theirs, 409 if not confirmed."""
    parsed = parse_uuid(reservation_id)
    if parsed is None:
        raise Problem(404, "reservation not found", code="not-found")
    row = repo.cancel_reservation(conn, reservation_id=parsed, driver_id=driver_id)
    if row is not None:
        return Answer(200, reservation_view(row), lot_ids=[str(row["lot_id"])])
    existing = repo.get_reservation(conn, reservation_id=parsed, driver_id=driver_id)
    if existing is None:
        raise Problem(404, "reservation not found", code="not-found")
    raise Problem(
        409, f"only a confirmed reservation can be cancelled, not a {existing['status']} one"
    )


def get(conn: psycopg.Connection[Any], *, driver_id: str, reservation_id: str) -> dict[str, Any]:
    parsed = parse_uuid(reservation_id)
    row = repo.get_reservation(conn, reservation_id=parsed, driver_id=driver_id) if parsed else None
    if row is None:
        raise Problem(404, "reservation not found", code="not-found")
    return reservation_view(row)


def encode_cursor(row: dict[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, ident = raw.partition("|")
        parsed = parse_uuid(ident)
        when = datetime.fromisoformat(at)
        if parsed is None or when.tzinfo is None:
            raise ValueError(cursor)
        return when, parsed
    except ValueError:
        raise Problem(
            422,
            "the cursor is not valid",
            code="validation",
            errors=[{"loc": ["query", "cursor"], "msg": "not a cursor this API issued"}],
        ) from None


def list_mine(
    conn: psycopg.Connection[Any], *, driver_id: str, limit: int, cursor: str | None
) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor else None
    rows = repo.list_reservations(conn, driver_id=driver_id, limit=limit + 1, before=before)
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [reservation_view(r) for r in rows],
        "next_cursor": encode_cursor(rows[-1]) if more and rows else None,
    }


def no_show_grace(settings: ReservationsSettings) -> timedelta:
    return timedelta(minutes=settings.no_show_grace_min)
