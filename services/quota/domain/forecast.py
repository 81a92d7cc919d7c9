"""Depletion and forfeiture forecasts: the recent daily rate of usage, and where it leads.

The rules are written in prose in docs/design/forecasts.md; in short:

- **Rate.** `daily_rate` weighs the billable calls of each whole UTC day of the last
  `WINDOW_DAYS` days (today, still running, is left out) by `DECAY ** (k - 1)` for the day `k`
  days back, and divides by the sum of the weights of the days counted. Idle days count as
  zero calls. Days before the scope's first billable call are not counted (a new account is
  not diluted by days it did not exist); without a whole day of usage the rate is 0. The
  result is rounded half-even to `RATE_PLACES` decimal places, and the walk uses exactly that
  rounded rate, so what the API shows is what the forecast assumed.
- **Walk.** From `now`, calls flow at that rate into the packages that are yet to end, in the
  deduction order of `deduction.py` (the one engine; the flow is not split by enterprise
  project, so packages designated for a project come after the shared ones). The first
  instant at which packages are in force yet none has quantity left is the *depletion time*;
  there is none when the packages end (expire) before that. What each package still holds when
  it ends is its *forfeiture*.

Everything is exact: quantities and instants are integers (calls, epoch microseconds) and the
walk runs on `fractions.Fraction`; the depletion time is rounded up to the whole second, a
forfeiture down to the whole call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from math import ceil, floor

from services.quota.domain.deduction import DeductionPolicy, deduction_key
from services.quota.domain.packages import ALL_PROJECTS, Package
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validity import ONE_SECOND

# The estimator (docs/design/forecasts.md, "The daily rate").
WINDOW_DAYS = 28
DECAY = Fraction(9, 10)  # weight of a day relative to the day after it: half-life ~6.6 days
RATE_PLACES = Decimal("0.001")

DAY_US = 86_400_000_000
SECOND_US = 1_000_000


@dataclass(frozen=True)
class Forfeiture:
    package_id: str
    expire_time: datetime
    quantity: int


@dataclass(frozen=True)
class Forecast:
    """The forecast of one account, region and API at `now`."""

    daily_rate: Decimal
    depletion_time: datetime | None
    forfeitures: tuple[Forfeiture, ...]

    def depleted_within(self, now: datetime, days: int) -> bool:
        return self.depletion_time is not None and self.depletion_time <= now + timedelta(days)

    def largest_forfeiture(self) -> Forfeiture | None:
        """The first (by expiry) of the largest forfeitures; None when nothing is forfeited."""
        best: Forfeiture | None = None
        for item in self.forfeitures:
            if best is None or item.quantity > best.quantity:
                best = item
        return best


def window(now: datetime) -> tuple[date, date]:
    """The whole UTC days the rate reads: [first, last], both inclusive."""
    today = now.astimezone(UTC).date()
    return today - timedelta(days=WINDOW_DAYS), today - timedelta(days=1)


def daily_rate(
    now: datetime, calls_by_day: Mapping[date, int], used_before_window: bool
) -> Decimal:
    """Exponentially weighted billable calls a day over the window ending yesterday.

    `calls_by_day` holds the billable calls of days of the window (missing days: none);
    `used_before_window` says the scope had billable calls before the window, so every day of
    the window counts; otherwise counting starts at the first day with calls."""
    first, last = window(now)
    if not used_before_window:
        used = sorted(d for d, calls in calls_by_day.items() if calls > 0 and first <= d <= last)
        if not used:
            return Decimal(0)
        first = used[0]
    weighted = Fraction(0)
    weights = Fraction(0)
    day, weight = last, Fraction(1)
    while day >= first:
        weighted += weight * calls_by_day.get(day, 0)
        weights += weight
        day -= timedelta(days=1)
        weight *= DECAY
    rate = weighted / weights
    return (Decimal(rate.numerator) / Decimal(rate.denominator)).quantize(
        RATE_PLACES, rounding=ROUND_HALF_EVEN
    )


def _begin_us(package: Package) -> int:
    return to_epoch_us(package.effective_time)


def _end_us(package: Package) -> int:
    # Valid up to and including the second expire_time (docs/design/deduction-order.md).
    return to_epoch_us(package.expire_time + ONE_SECOND)


def forecast(
    now: datetime,
    rate: Decimal,
    packages: Iterable[Package],
    policy: DeductionPolicy = DeductionPolicy.STANDARD,
) -> Forecast:
    """Walk `packages` (one account, region and API) from `now` at `rate` calls a day.

    Revoked packages and those ended by `now` are ignored; packages yet to begin join the walk
    when they begin."""
    if rate < 0:
        raise ValueError("rate must be >= 0")
    now_us = to_epoch_us(now)
    live: list[Package] = sorted(
        (p for p in packages if p.revoke_time is None and _end_us(p) > now_us),
        key=lambda p: deduction_key(p, ALL_PROJECTS, policy),
    )
    left = {p.package_id: Fraction(p.remaining_quantity) for p in live}
    per_us = Fraction(rate) / DAY_US
    t = Fraction(now_us)
    depletion: Fraction | None = None
    # Each pass ends at a package's exhaustion, end or beginning: at most three per package.
    for _ in range(3 * len(live) + 2):
        in_force = [p for p in live if _begin_us(p) <= t < _end_us(p)]
        drawable = [p for p in in_force if left[p.package_id] > 0]
        if depletion is None and in_force and not drawable:
            depletion = t
        later = [_begin_us(p) for p in live if _begin_us(p) > t and left[p.package_id] > 0]
        if not drawable:
            if not later:
                break
            t = Fraction(min(later))
            continue
        if per_us == 0:
            break
        first = drawable[0]
        until = min([_end_us(p) for p in drawable] + later)
        exhausted_at = t + left[first.package_id] / per_us
        if exhausted_at <= until:
            left[first.package_id] = Fraction(0)
            t = exhausted_at
        else:
            left[first.package_id] -= per_us * (until - t)
            t = Fraction(until)
    else:  # pragma: no cover - the bound above is a proof, not a guess
        raise AssertionError("forecast walk did not end")
    return Forecast(
        daily_rate=rate,
        depletion_time=None if depletion is None else _second_up(depletion),
        forfeitures=_forfeitures(live, left),
    )


def _second_up(t_us: Fraction) -> datetime:
    return from_epoch_us(ceil(t_us / SECOND_US) * SECOND_US)


def _forfeitures(live: Sequence[Package], left: Mapping[str, Fraction]) -> tuple[Forfeiture, ...]:
    items = [
        Forfeiture(p.package_id, p.expire_time, floor(left[p.package_id]))
        for p in sorted(live, key=lambda p: (p.expire_time, p.package_id))
    ]
    return tuple(item for item in items if item.quantity > 0)
