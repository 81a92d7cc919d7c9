"""Renewal of packages: when a package may be renewed by hand, and when auto-renewal tries.

Manual renewal (docs/design/billing.md)
=======================================

A package may be renewed while it has not expired and for 15 days after it expires. Its
``expire_time`` is the last covered second, so it expires at ``expire_time`` + 1 s and the
window closes 15 days (elapsed) after that: a package valid to 2024-04-19 23:59:59 may be
renewed up to and including 2024-05-04 23:59:59. Whether the package can be renewed at all (not
revoked, say) is for the caller to check; this is only the rule of time.

Renewing for ``periods`` periods of the offer's ``validity_months`` extends the expiry by
``periods × validity_months`` months by quota's validity rule
(``shared.validity.renewal_expire_time``): always counted from the **original
expiry**, even when renewing after it, so the new period does not start at the renewal. A
package renewed after it expired has forfeited its old remainder (``forfeits_remainder``);
quota does the forfeiting when it applies the renewal, billing only tells the customer.

Auto-renewal
============

The first attempt is at 03:00 on the billing time zone's clock, ``lead_days`` (default 7) days
before the local date of the expiry: a package expiring 2024-04-19 23:59:59 +08:00 is first
tried at 2024-04-12 03:00 +08:00. When an attempt fails (the balance is short), the next is at
03:00 on the following local day, as long as that is before the package expires; then
auto-renewal gives up (``next_attempt`` returns ``None``). An attempt that comes due while the
service is down, or a schedule switched on after its first attempt, is made as soon as it can
be: the caller runs every attempt whose time has passed. A successful renewal moves the expiry,
and the schedule starts again from the new one.

Renewal to a common expiry date (pro rata)
==========================================

Several packages may be renewed together so that all end at 23:59:59 (billing time zone) of
one date. Each is priced pro rata by whole days (``pro_rata``): the offer's price times the
days from its current expiry date to the common date, over the days of the one validity period
that would follow its current expiry, rounded half up to the micro; the calls added follow the
same fraction, rounded half up to a whole call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from shared.errors import FailedPrecondition
from shared.timeutil import MAX_TIME
from shared.validity import (
    LAST_SECOND_OF_DAY,
    ONE_SECOND,
    ValidityOutOfRange,
    add_months,
    as_utc,
    renewal_expire_time,
)

__all__ = [
    "ATTEMPT_TIME",
    "DEFAULT_LEAD_DAYS",
    "MAX_LEAD_DAYS",
    "RENEWAL_WINDOW_AFTER_EXPIRY",
    "ProRata",
    "common_expire_time",
    "first_attempt",
    "forfeits_remainder",
    "next_attempt",
    "pro_rata",
    "renewal_allowed",
    "renewal_window_end",
    "renewed_expire_time",
    "scheduled_attempt",
]

RENEWAL_WINDOW_AFTER_EXPIRY = timedelta(days=15)
DEFAULT_LEAD_DAYS = 7
# The longest lead: shorter than the shortest validity (one month, 28 days at least), so a
# package just renewed is never due for renewal again at once.
MAX_LEAD_DAYS = 27
# Auto-renewal runs at this local time, when few customers are watching their quota.
ATTEMPT_TIME = time(3, 0)
_ONE_DAY = timedelta(days=1)


def renewal_window_end(expire_time: datetime) -> datetime:
    """The first instant (UTC) at which manual renewal is no longer allowed."""
    return as_utc(expire_time, "expire_time") + ONE_SECOND + RENEWAL_WINDOW_AFTER_EXPIRY


def renewal_allowed(expire_time: datetime, now: datetime) -> bool:
    """Whether a package with last covered second ``expire_time`` may be renewed at ``now``."""
    return as_utc(now, "now") < renewal_window_end(expire_time)


def forfeits_remainder(expire_time: datetime, now: datetime) -> bool:
    """Whether a renewal at ``now`` comes after expiry, so the old remainder is already lost."""
    return as_utc(now, "now") >= as_utc(expire_time, "expire_time") + ONE_SECOND


def renewed_expire_time(
    expire_time: datetime, validity_months: int, periods: int, tz: tzinfo
) -> datetime:
    """The new last covered second (UTC) after renewing ``periods`` periods of an offer.

    Counted from the original ``expire_time`` by quota's rule: 2024-04-19 23:59:59 +08:00
    renewed for one 12-month period ends at 2025-04-19 23:59:59 +08:00.
    """
    if isinstance(periods, bool) or not isinstance(periods, int):
        raise TypeError(f"periods must be an int, got {type(periods).__name__}")
    if periods < 1:
        raise ValueError(f"periods must be >= 1, got {periods}")
    try:
        return renewal_expire_time(expire_time, validity_months * periods, tz)
    except ValidityOutOfRange:
        # The request is well-formed; the package's expiry makes it impossible
        # (docs/security.md, "Hostile input").
        raise FailedPrecondition(
            "VALIDITY_OUT_OF_RANGE",
            f"renewed for {periods} period(s), the package would run past {MAX_TIME.date()}",
            field="periods",
        ) from None


def _at_attempt_time(day: date, tz: tzinfo) -> datetime:
    # Should 03:00 fall in a gap of the clocks, fold=0 reads it with the offset before the
    # jump, which names the instant just after the gap: still that local morning.
    return datetime.combine(day, ATTEMPT_TIME, tzinfo=tz).astimezone(UTC)


def first_attempt(expire_time: datetime, lead_days: int, tz: tzinfo) -> datetime | None:
    """The first auto-renewal attempt (UTC): 03:00 local, ``lead_days`` before the expiry date.

    ``lead_days`` is set per package (``DEFAULT_LEAD_DAYS``, 7, unless chosen); 0 means 03:00
    on the day of expiry. ``None`` when that instant is not before the expiry (only possible
    with a lead of 0 and an expiry before 03:00), like ``next_attempt``.
    """
    if isinstance(lead_days, bool) or not isinstance(lead_days, int):
        raise TypeError(f"lead_days must be an int, got {type(lead_days).__name__}")
    if lead_days < 0:
        raise ValueError(f"lead_days must be >= 0, got {lead_days}")
    expiry_day = as_utc(expire_time, "expire_time").astimezone(tz).date()
    return _before_expiry(_at_attempt_time(expiry_day - timedelta(days=lead_days), tz), expire_time)


def _before_expiry(attempt: datetime, expire_time: datetime) -> datetime | None:
    if attempt >= as_utc(expire_time, "expire_time") + ONE_SECOND:
        return None
    return attempt


def next_attempt(last_attempt: datetime, expire_time: datetime, tz: tzinfo) -> datetime | None:
    """The attempt after a failed one at ``last_attempt``: 03:00 local the next day.

    ``None`` once that is no longer before the expiry (the package has run out).
    """
    day_after = as_utc(last_attempt, "last_attempt").astimezone(tz).date() + _ONE_DAY
    return _before_expiry(_at_attempt_time(day_after, tz), expire_time)


def scheduled_attempt(
    expire_time: datetime, lead_days: int, now: datetime, tz: tzinfo
) -> datetime | None:
    """The attempt an enabled schedule waits for, at ``now``, for a package valid to
    ``expire_time``: the first attempt of that expiry, which may have passed already (it is then
    due at once). After an attempt has been made for this expiry, it is not used again: a
    success moves the expiry (by at least a month, more than ``MAX_LEAD_DAYS``, so the new
    first attempt lies ahead) and a failure takes ``next_attempt``. ``None`` once the package
    has expired."""
    now = as_utc(now, "now")
    if now >= as_utc(expire_time, "expire_time") + ONE_SECOND:
        return None
    return first_attempt(expire_time, lead_days, tz)


@dataclass(frozen=True)
class ProRata:
    """One package's share of a renewal to a common expiry date (``pro_rata``)."""

    days: int
    period_days: int
    price_micros: int
    quantity: int
    expire_time: datetime


def common_expire_time(expire_date: date, tz: tzinfo) -> datetime:
    """The last covered second (UTC) of a renewal to ``expire_date``: 23:59:59 local."""
    return datetime.combine(expire_date, LAST_SECOND_OF_DAY, tzinfo=tz).astimezone(UTC)


def _half_up(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half up (both non-negative, exact integers)."""
    return (2 * numerator + denominator) // (2 * denominator)


def pro_rata(
    expire_time: datetime,
    expire_date: date,
    validity_months: int,
    price_micros: int,
    quantity: int,
    tz: tzinfo,
) -> ProRata:
    """Renewing a package valid to ``expire_time`` until 23:59:59 of ``expire_date`` (local).

    ``days`` are the whole days added: from the local date of the current expiry to
    ``expire_date``. ``period_days`` are the days of the validity period that would follow
    the current expiry (``validity_months`` later by quota's rule: 2024-04-19 + 1 month is 30
    days, + 12 months 365). The price is ``price_micros × days / period_days`` and the calls
    added ``quantity × days / period_days``, each rounded half up to a whole micro and a whole
    call, so renewing to exactly one period later costs the offer's price and adds its
    quantity, as ``RenewPackage`` does. ``days`` below 1 is for the caller to refuse.
    """
    current = as_utc(expire_time, "expire_time").astimezone(tz).date()
    days = (expire_date - current).days
    period_days = (add_months(current, validity_months) - current).days
    return ProRata(
        days=days,
        period_days=period_days,
        price_micros=_half_up(price_micros * max(days, 0), period_days),
        quantity=_half_up(quantity * max(days, 0), period_days),
        expire_time=common_expire_time(expire_date, tz),
    )
