"""The billing calendar: hourly settlement cycles and calendar months, in the billing time zone.

Pay-per-use usage is grouped into **hourly cycles** by the ``occur_time`` of each call
(docs/design/time.md). A cycle is one hour of the billing time zone's clock: calls at 08:45, 08:50
and 08:55 share the cycle 08:00–09:00; calls at 09:59:50 and 10:00:10 fall in two cycles. A cycle
is the half-open interval [start, end): a call at exactly 09:00:00 belongs to 09:00–10:00. It is
settled once it has ended, when ``now >= end`` (``cycle_due``).

For a zone whose offset is a whole number of hours the cycles are simply the UTC hours. In a
half-hour zone (India, UTC+05:30) they are the local hours, so they start at :30 past the UTC
hour. Either way a cycle never straddles local midnight, so each cycle lies in one calendar
month and one tier count. Where the clocks change, a cycle also ends at the change: when
New York falls back, 01:00–02:00 local happens twice and makes two one-hour cycles, both
labelled 01:00 locally; a zone that shifts by half an hour gets one half-hour cycle.

**Months** are the calendar months of the billing time zone, named ``"YYYY-MM"``: tiers count
calls per month, and bills cover one. A month runs from the first instant of its first local
day to the first instant of the next month.

Every instant taken or returned is timezone-aware; results are in UTC.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from shared.timeutil import MAX_TIME, MIN_TIME
from shared.validity import as_utc, month_key

__all__ = [
    "CYCLE_LENGTH",
    "cycle_due",
    "cycle_end",
    "cycle_start",
    "month_bounds",
    "month_key",
    "parse_month",
]

CYCLE_LENGTH = timedelta(hours=1)
_MICROSECOND = timedelta(microseconds=1)
# ASCII digits only: \d would also take Arabic-Indic or full-width digits (docs/security.md).
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")


def _offset(instant: datetime, tz: tzinfo) -> timedelta | None:
    return instant.astimezone(tz).utcoffset()


def _into_hour(instant: datetime, tz: tzinfo) -> timedelta:
    """How far ``instant`` is past the top of the hour on the local clock."""
    local = instant.astimezone(tz)
    return timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)


def _first_instant(low: datetime, high: datetime, holds: Callable[[datetime], bool]) -> datetime:
    """The first instant in (low, high] at which ``holds`` becomes true, to the microsecond.

    ``holds`` must be false at ``low``, true at ``high`` and change only once in between: here,
    the single change of UTC offset that falls inside one hour.
    """
    while high - low > _MICROSECOND:
        middle = low + (high - low) // 2
        if holds(middle):
            high = middle
        else:
            low = middle
    return high


def cycle_start(occur_time: datetime, tz: tzinfo) -> datetime:
    """The start (UTC) of the hourly cycle containing ``occur_time`` on ``tz``'s clock.

    2024-05-01 08:45:00+08:00 → 2024-05-01 00:00:00 UTC (08:00 local).
    """
    t = as_utc(occur_time, "occur_time")
    start = t - _into_hour(t, tz)
    offset = _offset(t, tz)
    if _offset(start, tz) != offset:
        # The clocks changed during this hour, after the top of it: the cycle starts there.
        start = _first_instant(start, t, lambda u: _offset(u, tz) == offset)
    return start


def cycle_end(start: datetime, tz: tzinfo) -> datetime:
    """The end (UTC, exclusive) of the hourly cycle containing ``start``: the next cycle's start.

    Usually ``start`` + 1 hour; earlier when the clocks change inside the hour.
    """
    t = as_utc(start, "start")
    end = t - _into_hour(t, tz) + CYCLE_LENGTH
    offset = _offset(t, tz)
    if _offset(end, tz) != offset:
        end = _first_instant(t, end, lambda u: _offset(u, tz) != offset)
    return end


def cycle_due(start: datetime, now: datetime, tz: tzinfo) -> bool:
    """Whether the cycle containing ``start`` has ended at ``now`` and may be settled."""
    return as_utc(now, "now") >= cycle_end(start, tz)


def parse_month(month: str) -> tuple[int, int]:
    """``"2024-05"`` → ``(2024, 5)``; anything else raises ``ValueError``.

    The year lies in the range of accepted instants (2000-8999, shared.timeutil), so that the
    month and the one after it always have bounds.
    """
    match = _MONTH.fullmatch(month) if isinstance(month, str) else None
    if match is None or not 1 <= int(match[2]) <= 12:
        raise ValueError(f"month must be YYYY-MM, like 2024-05, not {month!r}")
    if not MIN_TIME.year <= int(match[1]) < MAX_TIME.year:
        raise ValueError(
            f"month must lie in the years {MIN_TIME.year}-{MAX_TIME.year - 1}, not {month!r}"
        )
    return int(match[1]), int(match[2])


def month_bounds(month: str, tz: tzinfo) -> tuple[datetime, datetime]:
    """The first instant of ``month`` and of the month after it, in UTC: ``[start, end)``.

    ``"2024-05"`` in UTC+08:00 is 2024-04-30 16:00 UTC to 2024-05-31 16:00 UTC.
    """
    year, number = parse_month(month)
    following = date(year + 1, 1, 1) if number == 12 else date(year, number + 1, 1)
    return _day_start(date(year, number, 1), tz), _day_start(following, tz)


def _day_start(day: date, tz: tzinfo) -> datetime:
    """The first instant whose local date is ``day`` (its midnight, or the end of a skipped
    midnight where the clocks jump over it)."""
    midnight = datetime.combine(day, time(), tzinfo=tz)  # fold=0: the first of a repeat
    instant = midnight.astimezone(UTC)
    local = instant.astimezone(tz)
    if local.date() == day and local.time() == time():
        return instant
    # Midnight was skipped. Read with the offsets before and after the jump, it names two
    # instants around the jump; the day begins at the first instant of that span on ``day``.
    low, high = sorted((instant, midnight.replace(fold=1).astimezone(UTC)))
    return _first_instant(low, high, lambda u: u.astimezone(tz).date() >= day)
