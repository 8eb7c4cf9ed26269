"""Business rules of reservations: prices, windows, plates and idempotent request identity.

Pure functions, no I/O: the views and the repository call them.

Choices the API leaves open, fixed here:

- Windows are exact: no rounding to time buckets. Capacity is checked against the exact
  instants of every overlapping confirmed window (half-open ``[start, end)``, so a window that
  ends when another starts does not overlap it).
- Prices are pro rata per started minute: the window's length is rounded up to whole minutes,
  the tariff's ``free_minutes`` are free once (at the start), the rest costs ``per_hour / 60``
  a minute, and each 24-hour period counted from the start costs at most ``daily_max``. The
  total is rounded half-up to cents.
- A lot is open for a window when the whole window lies within its opening hours.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from services.common.lots import Tariff, is_open

CENT = Decimal("0.01")
MINUTES_PER_DAY = 24 * 60
# A start this far in the past is still "now": clients' clocks and the trip to the server.
START_TOLERANCE = timedelta(seconds=60)
# A car may arrive this long before its window starts and still use its reservation.
EARLY_ARRIVAL = timedelta(minutes=15)
_PLATE = re.compile(r"^[^\W_](?:[^\W_]| |-){0,15}$")
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Later instants are no real booking, and date arithmetic near year 9999 overflows.
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class WindowError(ValueError):
    """A reservation window that cannot be booked; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Price:
    amount: Decimal
    currency: str

    def as_json(self) -> dict[str, str]:
        return {"amount": str(self.amount), "currency": self.currency}


def is_valid_plate(plate: str) -> bool:
    """1 to 16 letters (any script), digits, spaces and dashes, starting with a letter or digit."""
    return bool(_PLATE.match(plate))


def is_valid_email(email: str) -> bool:
    return 3 <= len(email) <= 254 and bool(_EMAIL.match(email))


def has_control_characters(value: str) -> bool:
    return bool(_CONTROL.search(value))


def price_of(tariff: Tariff, start: datetime, end: datetime) -> Price:
    """The price of parking from ``start`` to ``end`` under ``tariff`` (see the module doc)."""
    minutes = math.ceil((end - start).total_seconds() / 60)
    if minutes <= 0:
        return Price(Decimal("0.00"), tariff.currency)

    def period(length: int, free: int) -> Decimal:
        amount = tariff.per_hour * max(0, length - free) / 60
        if tariff.daily_max is not None:
            amount = min(amount, tariff.daily_max)
        return amount

    periods = math.ceil(minutes / MINUTES_PER_DAY)
    if periods == 1:
        total = period(minutes, tariff.free_minutes)
    else:
        last = minutes - MINUTES_PER_DAY * (periods - 1)
        total = (
            period(MINUTES_PER_DAY, tariff.free_minutes)
            + (periods - 2) * period(MINUTES_PER_DAY, 0)
            + period(last, 0)
        )
    return Price(total.quantize(CENT, rounding=ROUND_HALF_UP), tariff.currency)


def check_window(start: datetime, end: datetime, *, now: datetime, max_window_h: float) -> None:
    """Raise WindowError unless the window ends after it starts, is not past, and not too long."""
    if end <= start:
        raise WindowError("end", "end must be after start")
    if start < now - START_TOLERANCE:
        raise WindowError("start", "start must not be in the past")
    if end - start > timedelta(hours=max_window_h):
        raise WindowError("end", f"a reservation may last at most {max_window_h:g} hours")
    if end >= LATEST:
        raise WindowError("end", "end is too far in the future")


def open_for_window(opening_hours: str, timezone: str, start: datetime, end: datetime) -> bool:
    """Whether the lot is open at every instant of ``[start, end)``.

    ``is_open`` only changes at the local closing and opening times, so the window is open
    throughout if the lot is open at its start and at every closing time inside it (a closing
    time at which it is still open, such as 24:00 of "00:00-24:00", is no closure).
    """
    match = _HOURS.match(opening_hours)
    if match is None:  # "24/7"
        return True
    if not is_open(opening_hours, timezone, start):
        return False
    zone = ZoneInfo(timezone)
    close_h, close_m = int(match.group(3)), int(match.group(4))
    day: date = start.astimezone(zone).date() - timedelta(days=1)
    last: date = end.astimezone(zone).date() + timedelta(days=1)
    while day <= last:
        if close_h == 24:
            local = datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=zone)
        else:
            local = datetime.combine(day, time(close_h, close_m), tzinfo=zone)
        closing = local.astimezone(UTC)
        if start < closing < end and not is_open(opening_hours, timezone, closing):
            return False
        day += timedelta(days=1)
    return True


def no_show_after(starts_at: datetime, ends_at: datetime, grace: timedelta) -> datetime:
    """When an unarrived reservation becomes a no-show: start + grace, or its end if sooner."""
    return min(starts_at + grace, ends_at)


def request_hash(key: str, body: Any) -> bytes:
    """Keyed hash of the canonical JSON of a request body (sorted keys, no spaces).

    Keyed, because the body holds a licence plate, which is stored only keyed-hashed.
    """
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hmac.new(key.encode(), canonical, hashlib.sha256).digest()


def rfc3339(at: datetime) -> str:
    """``at`` in UTC as RFC 3339 with a ``Z``."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
