"""``_periods.period_start``: the UTC start of the current minute / hour / day / week / month."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tokenguard import ConfigurationError
from tokenguard._periods import PERIODS, period_start

# Wednesday 2026-03-18 14:37:52.123456 UTC
NOW = datetime(2026, 3, 18, 14, 37, 52, 123456, tzinfo=UTC)


def test_periods_are_the_documented_ones() -> None:
    """The known periods are exactly minute, hour, day, week, month and total."""
    assert set(PERIODS) == {"minute", "hour", "day", "week", "month", "total"}


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        ("minute", datetime(2026, 3, 18, 14, 37, tzinfo=UTC)),
        ("hour", datetime(2026, 3, 18, 14, tzinfo=UTC)),
        ("day", datetime(2026, 3, 18, tzinfo=UTC)),
        ("week", datetime(2026, 3, 16, tzinfo=UTC)),  # the Monday before
        ("month", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_start_of_each_period(period: str, expected: datetime) -> None:
    """Each period starts at the expected UTC instant for a time in the middle of it."""
    start = period_start(period, NOW)
    assert start == expected
    assert start is not None
    assert start.utcoffset() == timedelta(0)


def test_total_has_no_start() -> None:
    """The "total" period is all time: its start is None."""
    assert period_start("total", NOW) is None


@pytest.mark.parametrize("period", ["minute", "hour", "day", "week", "month"])
def test_a_start_is_its_own_start(period: str) -> None:
    """Applying period_start to a period's start returns the same instant (boundary belongs to the new period)."""
    start = period_start(period, NOW)
    assert start is not None
    assert period_start(period, start) == start


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        ("minute", datetime(2026, 3, 18, 14, 37, tzinfo=UTC)),
        ("hour", datetime(2026, 3, 18, 14, tzinfo=UTC)),
        ("day", datetime(2026, 3, 18, tzinfo=UTC)),
        ("week", datetime(2026, 3, 16, tzinfo=UTC)),
        ("month", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_last_microsecond_belongs_to_the_period(period: str, expected: datetime) -> None:
    """One microsecond before the next period starts is still in the current one."""
    start = period_start(period, NOW)
    assert start == expected
    nxt = {
        "minute": start + timedelta(minutes=1),
        "hour": start + timedelta(hours=1),
        "day": start + timedelta(days=1),
        "week": start + timedelta(weeks=1),
        "month": datetime(2026, 4, 1, tzinfo=UTC),
    }[period]
    assert period_start(period, nxt - timedelta(microseconds=1)) == start
    assert period_start(period, nxt) == nxt


@pytest.mark.parametrize(
    ("now", "monday"),
    [
        (datetime(2026, 11, 23, 0, 0, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC)),  # a Monday
        (datetime(2026, 11, 22, 23, 59, 59, tzinfo=UTC), datetime(2026, 11, 16, tzinfo=UTC)),  # a Sunday
        (datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2025, 12, 29, tzinfo=UTC)),  # across a year
        (datetime(2026, 3, 1, 8, tzinfo=UTC), datetime(2026, 2, 23, tzinfo=UTC)),  # across a month
    ],
)
def test_weeks_start_on_monday(now: datetime, monday: datetime) -> None:
    """A week starts on the Monday at or before ``now`` (ISO 8601), even across month and year ends."""
    start = period_start("week", now)
    assert start == monday
    assert start is not None
    assert start.weekday() == 0


@pytest.mark.parametrize(
    ("now", "first"),
    [
        (datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, 12, tzinfo=UTC), datetime(2028, 2, 1, tzinfo=UTC)),  # leap day
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
        (datetime(2026, 4, 30, 23, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
    ],
)
def test_months_start_on_the_first(now: datetime, first: datetime) -> None:
    """A month starts at 00:00 UTC on its first day."""
    assert period_start("month", now) == first


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        ("minute", datetime(2026, 2, 28, 23, 30, tzinfo=UTC)),
        ("hour", datetime(2026, 2, 28, 23, tzinfo=UTC)),
        ("day", datetime(2026, 2, 28, tzinfo=UTC)),
        ("week", datetime(2026, 2, 23, tzinfo=UTC)),
        ("month", datetime(2026, 2, 1, tzinfo=UTC)),
    ],
)
def test_non_utc_input_is_converted_to_utc_first(period: str, expected: datetime) -> None:
    """An aware time in another zone is converted to UTC before its period is found (01:30+02:00 is the day before)."""
    now = datetime(2026, 3, 1, 1, 30, 15, tzinfo=timezone(timedelta(hours=2)))
    start = period_start(period, now)
    assert start == expected
    assert start is not None
    assert start.utcoffset() == timedelta(0)
    assert (start.year, start.month, start.day, start.hour) == (
        expected.year,
        expected.month,
        expected.day,
        expected.hour,
    )


def test_negative_offset_can_move_into_next_month() -> None:
    """23:00-05:00 on Jan 31 is Feb 1 in UTC, so its month is February."""
    now = datetime(2026, 1, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert period_start("month", now) == datetime(2026, 2, 1, tzinfo=UTC)
    assert period_start("day", now) == datetime(2026, 2, 1, tzinfo=UTC)


@pytest.mark.parametrize("period", ["year", "Day", "", "weekly", "seconds"])
def test_unknown_period_is_a_configuration_error(period: str) -> None:
    """An unknown period raises ConfigurationError naming the "period" setting."""
    with pytest.raises(ConfigurationError) as info:
        period_start(period, NOW)
    assert info.value.setting == "period"
    assert "period" in str(info.value)
    assert repr(period) in str(info.value)
