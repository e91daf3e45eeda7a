"""Calendar periods in UTC: where the current minute / hour / day / week / month starts.

Budgets and ``Guard.spent()`` count spend from the start of the current period; this
module owns that arithmetic and nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final, Literal, get_args

from ._errors import ConfigurationError

__all__ = ["PERIODS", "Period", "period_end", "period_start"]

Period = Literal["minute", "hour", "day", "week", "month", "total"]
PERIODS: Final[tuple[str, ...]] = get_args(Period)


def period_start(period: str, now: datetime) -> datetime | None:
    """The UTC start of the ``period`` containing ``now``; ``None`` for ``"total"`` (all time).

    Weeks start on Monday (ISO 8601).
    """
    if period not in PERIODS:
        raise ConfigurationError("period", period, f"must be one of {', '.join(PERIODS)}")
    if period == "total":
        return None
    now = now.astimezone(UTC)
    if period == "minute":
        return now.replace(second=0, microsecond=0)
    if period == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(period: str, now: datetime) -> datetime | None:
    """When the ``period`` containing ``now`` ends (the next one starts); ``None`` for ``"total"``."""
    start = period_start(period, now)
    if start is None:
        return None
    if period == "minute":
        return start + timedelta(minutes=1)
    if period == "hour":
        return start + timedelta(hours=1)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(weeks=1)
    return (start + timedelta(days=32)).replace(day=1)
