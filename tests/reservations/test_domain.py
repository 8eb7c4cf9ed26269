"""Pure rules: prices, windows, opening hours, plates, request identity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.lots import Tariff
from services.reservations import domain

T0 = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)  # 10:00 in Asia/Shanghai
TARIFF = Tariff(per_hour=Decimal("6.00"), free_minutes=15, daily_max=Decimal("40.00"))


def price(minutes: float, tariff: Tariff = TARIFF) -> str:
    return str(domain.price_of(tariff, T0, T0 + timedelta(minutes=minutes)).amount)


def test_free_minutes_then_pro_rata_per_started_minute() -> None:
    assert price(15) == "0.00"
    assert price(16) == "0.10"
    assert price(15.01) == "0.10"  # a started minute counts
    assert price(75) == "6.00"
    assert price(135) == "12.00"


def test_daily_max_caps_each_24_hours_from_the_start() -> None:
    assert price(10 * 60) == "40.00"  # 58.50 capped
    assert price(24 * 60) == "40.00"
    assert price(24 * 60 + 30) == "43.00"  # second day: 30 minutes, no free minutes again
    assert price(72 * 60) == "120.00"


def test_no_daily_max_and_currency() -> None:
    t = Tariff(currency="EUR", per_hour=Decimal("2.50"), free_minutes=0)
    p = domain.price_of(t, T0, T0 + timedelta(hours=30))
    assert p.as_json() == {"amount": "75.00", "currency": "EUR"}


def test_amounts_round_half_up_to_cents() -> None:
    t = Tariff(per_hour=Decimal("1.00"), free_minutes=0)
    assert price(1, t) == "0.02"  # 0.01666...
    assert price(3, t) == "0.05"


@given(
    a=st.integers(min_value=0, max_value=3 * 1440),
    b=st.integers(min_value=0, max_value=3 * 1440),
)
def test_price_never_falls_as_the_window_grows(a: int, b: int) -> None:
    short, long_ = sorted((a, b))
    assert Decimal(price(short)) <= Decimal(price(long_))
    assert Decimal(price(long_)) <= Decimal("40.00") * (long_ // 1440 + 1)


def test_window_checks() -> None:
    now = T0
    domain.check_window(now, now + timedelta(hours=2), now=now, max_window_h=24)
    domain.check_window(
        now - timedelta(seconds=30), now + timedelta(hours=1), now=now, max_window_h=24
    )
    cases = [
        (now + timedelta(hours=2), now + timedelta(hours=1), "end"),
        (now + timedelta(hours=2), now + timedelta(hours=2), "end"),
        (now - timedelta(minutes=5), now + timedelta(hours=1), "start"),
        (now, now + timedelta(hours=24, seconds=1), "end"),
    ]
    for start, end, field in cases:
        with pytest.raises(domain.WindowError) as err:
            domain.check_window(start, end, now=now, max_window_h=24)
        assert err.value.field == field


def local(day: int, hour: int, minute: int = 0) -> datetime:
    """A Shanghai wall-clock time (UTC+8, no DST) in June 2026, as UTC."""
    return datetime(2026, 6, day, hour, minute, tzinfo=UTC) - timedelta(hours=8)


@pytest.mark.parametrize(
    ("hours", "start", "end", "expected"),
    [
        ("24/7", local(1, 3), local(2, 3), True),
        ("08:00-20:00", local(1, 8), local(1, 20), True),
        ("08:00-20:00", local(1, 7, 59), local(1, 9), False),
        ("08:00-20:00", local(1, 19), local(1, 20, 1), False),
        ("08:00-20:00", local(1, 19), local(2, 9), False),  # across the night
        ("22:00-06:00", local(1, 23), local(2, 5), True),  # wraps past midnight
        ("22:00-06:00", local(1, 23), local(2, 7), False),
        ("22:00-06:00", local(1, 12), local(1, 13), False),
        ("00:00-24:00", local(1, 20), local(2, 4), True),  # 24:00 is no closure
        ("08:00-24:00", local(1, 20), local(2, 1), False),
        ("08:00-24:00", local(1, 20), local(2, 0), True),
    ],
)
def test_open_for_the_whole_window(
    hours: str, start: datetime, end: datetime, expected: bool
) -> None:
    assert domain.open_for_window(hours, "Asia/Shanghai", start, end) is expected


def test_opening_hours_follow_daylight_saving() -> None:
    # Berlin, 29 March 2026: clocks go from 02:00 to 03:00 (UTC+1 -> UTC+2).
    start = datetime(2026, 3, 29, 6, 0, tzinfo=UTC)  # 08:00 local (after the change)
    assert domain.open_for_window(
        "07:30-20:00", "Europe/Berlin", start, start + timedelta(hours=11)
    )
    assert not domain.open_for_window(
        "07:30-20:00", "Europe/Berlin", start, start + timedelta(hours=12, minutes=1)
    )


@pytest.mark.parametrize(
    ("plate", "ok"),
    [
        ("浙A12345", True),
        ("B-AB 1234", True),
        ("ab12", True),
        ("7", True),
        ("", False),
        (" AB12", False),
        ("-AB12", False),
        ("AB_12", False),
        ("AB12;", False),
        ("A" * 16, True),
        ("A" * 17, False),
    ],
)
def test_plates(plate: str, ok: bool) -> None:
    assert domain.is_valid_plate(plate) is ok


def test_request_hash_is_canonical_and_keyed() -> None:
    a = {"lot_id": "x", "plate": "浙A1", "start": "s"}
    b = {"start": "s", "plate": "浙A1", "lot_id": "x"}
    assert domain.request_hash("k", a) == domain.request_hash("k", b)
    assert domain.request_hash("k", a) != domain.request_hash("other", a)
    assert domain.request_hash("k", a) != domain.request_hash("k", {**a, "plate": "浙A2"})
