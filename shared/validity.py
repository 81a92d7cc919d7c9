"""Validity periods of packages: where a package bought or renewed for N months ends.

A package bought at any moment of a day runs until 23:59:59 of the same calendar day N months
later in the billing time zone; a day that the target month lacks is clamped to its last day.
Quota (grants, renewals) and billing (orders, renewals, auto-renewal) apply the same rule, so
it lives here rather than in either service; so does the calendar month of an instant in the
billing time zone (`month_key`), which billing's bills and limits and quota's spending caps
count by.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

from shared.timeutil import MAX_TIME

# The last covered second of a validity period; the package covers it in full.
LAST_SECOND_OF_DAY = time(23, 59, 59)
# Validity runs to the second and the last second is included, so a package covers instants
# strictly before expire_time + 1 s.
ONE_SECOND = timedelta(seconds=1)


class ValidityOutOfRange(ValueError):
    """A validity period that would end at or after shared.timeutil.MAX_TIME (9000-01-01):
    the callers refuse it naming their field (docs/security.md, "Hostile input")."""


def as_utc(value: datetime, name: str = "datetime") -> datetime:
    """Return ``value`` converted to UTC, rejecting naive datetimes.

    A naive datetime names no instant (its zone is a guess), so it is refused where it enters
    the domain instead of being compared wrongly later.
    """
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def month_key(t: datetime, tz: tzinfo) -> str:
    """The calendar month (``"YYYY-MM"``) of ``t`` in ``tz``.

    2024-04-30 16:00:00 UTC is already ``"2024-05"`` in UTC+08:00.
    """
    local = as_utc(t, "t").astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def add_months(d: date, months: int) -> date:
    """Return ``d`` moved by ``months`` calendar months, clamped to the target month's end.

    2024-01-31 + 1 month is 2024-02-29; 2024-02-29 + 12 months is 2025-02-28.
    """
    month_index = d.year * 12 + (d.month - 1) + months
    year, month0 = divmod(month_index, 12)
    month = month0 + 1
    if not 1 <= year <= 9999:
        raise ValidityOutOfRange(f"{d.isoformat()} + {months} months is out of range")
    last_day = calendar.monthrange(year, month)[1]
    return date(year, month, min(d.day, last_day))


def _end_of_local_day(day: date, tz: ZoneInfo) -> datetime:
    # fold=0: should 23:59:59 ever be ambiguous (a DST fall-back at midnight), take the earlier
    # instant, so a package never runs longer than its local calendar says.
    end = datetime.combine(day, LAST_SECOND_OF_DAY, tzinfo=tz).astimezone(UTC)
    if end >= MAX_TIME:
        raise ValidityOutOfRange(f"a validity period ending {day.isoformat()} is out of range")
    return end


def _require_period(months: int) -> None:
    if isinstance(months, bool) or not isinstance(months, int):
        raise TypeError(f"months must be an int, got {type(months).__name__}")
    if months < 1:
        raise ValueError(f"a validity period is at least one month, got {months}")


def package_expire_time(start: datetime, months: int, tz: ZoneInfo) -> datetime:
    """Return the last covered second (UTC) of a package starting at ``start`` for ``months``.

    Raises ValidityOutOfRange when it would end at or after 9000-01-01.

    The period is counted on the calendar of ``tz`` (the billing time zone): the local date of
    ``start`` plus ``months``, at 23:59:59 local time. A one-year package bought at
    2023-04-19 14:25:10+08:00 ends at 2024-04-19 23:59:59+08:00.
    """
    _require_period(months)
    local_start = as_utc(start, "start").astimezone(tz)
    return _end_of_local_day(add_months(local_start.date(), months), tz)


def renewal_expire_time(current_expire: datetime, months: int, tz: ZoneInfo) -> datetime:
    """Return the new last covered second (UTC) after renewing for ``months``.

    Raises ValidityOutOfRange when it would end at or after 9000-01-01.

    The renewal extends from the local date of the current expiry by ``months``, at 23:59:59
    local time, by the same rule as a purchase. Clamping is not undone later: a package ending
    on 31 March renewed twice by one month ends on 30 April, then on 30 May, because only the
    current expiry is known, not the day it was first bought.
    """
    _require_period(months)
    local_expire = as_utc(current_expire, "current_expire").astimezone(tz)
    return _end_of_local_day(add_months(local_expire.date(), months), tz)
