"""The forecast's pure rules (docs/design/forecasts.md): the daily rate estimator and the
depletion / forfeiture walk over the packages in deduction order."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest

from services.quota.domain.deduction import DeductionPolicy
from services.quota.domain.forecast import (
    DECAY,
    WINDOW_DAYS,
    Forfeiture,
    daily_rate,
    forecast,
    window,
)
from services.quota.domain.packages import Package, PackageSource

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)  # noon: today (Mar 1) is not a whole day yet
YESTERDAY = date(2024, 2, 29)


def pkg(
    package_id: str,
    total: int,
    *,
    used: int = 0,
    effective: datetime = datetime(2024, 1, 1, tzinfo=UTC),
    expire: datetime = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC),
    source: PackageSource = PackageSource.SUBSCRIPTION,
    revoked: bool = False,
) -> Package:
    return Package(
        package_id=package_id,
        account_id="acct-1",
        region="r",
        api="a",
        enterprise_project_id="",
        source=source,
        total_quantity=total,
        used_quantity=used,
        effective_time=effective,
        expire_time=expire,
        create_time=datetime(2024, 1, 1, tzinfo=UTC),
        revoke_time=effective if revoked else None,
    )


# --- the estimator -------------------------------------------------------------------------


def test_window_is_the_whole_utc_days_before_today():
    assert window(NOW) == (YESTERDAY - timedelta(days=WINDOW_DAYS - 1), YESTERDAY)
    # An instant on another clock reads the same UTC days.
    eight = datetime(2024, 3, 1, 20, 0, tzinfo=UTC).astimezone()
    assert window(eight) == window(NOW)


def test_steady_usage_gives_its_own_rate():
    calls = {YESTERDAY - timedelta(days=k): 100 for k in range(WINDOW_DAYS)}
    assert daily_rate(NOW, calls, used_before_window=True) == Decimal(100)


def test_no_usage_gives_zero():
    assert daily_rate(NOW, {}, used_before_window=False) == 0
    # Calls today only: no whole day of usage yet.
    assert daily_rate(NOW, {date(2024, 3, 1): 500}, used_before_window=False) == 0


def test_a_new_account_counts_from_its_first_day_of_usage():
    calls = {YESTERDAY - timedelta(days=1): 300, YESTERDAY: 100}
    expected = (Fraction(100) + DECAY * 300) / (1 + DECAY)  # (100 + 270) / 1.9
    assert daily_rate(NOW, calls, used_before_window=False) == Decimal("194.737")
    assert abs(Fraction(str(daily_rate(NOW, calls, False))) - expected) <= Fraction(1, 2000)


def test_idle_days_count_as_zero_and_recent_days_weigh_more():
    # Used before the window: every day counts, the idle ones as 0.
    only_old = {YESTERDAY - timedelta(days=20): 1_000}
    only_new = {YESTERDAY: 1_000}
    old = daily_rate(NOW, only_old, used_before_window=True)
    new = daily_rate(NOW, only_new, used_before_window=True)
    assert 0 < old < new < 1_000
    weights = sum(DECAY**k for k in range(WINDOW_DAYS))
    assert new == Decimal(str(round(float(1_000 / weights), 3)))  # 1000 / sum of the weights
    # Without earlier usage the idle days after the first day count, the ones before do not.
    assert daily_rate(NOW, only_old, used_before_window=False) > old


def test_days_outside_the_window_are_ignored():
    calls = {date(2024, 3, 1): 10_000, YESTERDAY - timedelta(days=WINDOW_DAYS): 10_000}
    assert daily_rate(NOW, calls, used_before_window=True) == 0


def test_the_rate_is_rounded_to_thousandths():
    calls = {YESTERDAY: 1, YESTERDAY - timedelta(days=1): 0, YESTERDAY - timedelta(days=2): 1}
    rate = daily_rate(NOW, calls, used_before_window=True)
    assert rate.as_tuple().exponent >= -3
    assert isinstance(rate, Decimal)


# --- the walk ------------------------------------------------------------------------------


def test_one_package_is_used_up_at_the_rate():
    result = forecast(NOW, Decimal(100), [pkg("p1", 1_000, used=300)])
    assert result.depletion_time == NOW + timedelta(days=7)
    assert result.forfeitures == ()
    assert result.depleted_within(NOW, 7) and not result.depleted_within(NOW, 6)


def test_no_usage_never_depletes_and_forfeits_everything():
    expire = datetime(2024, 6, 30, 23, 59, 59, tzinfo=UTC)
    result = forecast(NOW, Decimal(0), [pkg("p1", 1_000, used=100, expire=expire)])
    assert result.depletion_time is None
    assert result.forfeitures == (Forfeiture("p1", expire, 900),)


def test_expiry_before_depletion_forfeits_the_rest_and_never_depletes():
    expire = NOW + timedelta(days=5) - timedelta(seconds=1)  # ends exactly 5 days from now
    result = forecast(NOW, Decimal(100), [pkg("p1", 1_000, expire=expire)])
    assert result.depletion_time is None
    assert result.forfeitures == (Forfeiture("p1", expire, 500),)


def test_several_packages_in_deduction_order():
    # FREE first (step 2), whatever its expiry; the purchased one that expires first keeps
    # its quantity while the free one is drawn, and forfeits part of it.
    soon = NOW + timedelta(days=10) - timedelta(seconds=1)
    free = pkg("free", 500, source=PackageSource.FREE)
    bought_soon = pkg("soon", 1_000, expire=soon)  # began first: step 3 draws it first
    bought_late = pkg("late", 1_000, effective=datetime(2024, 2, 1, tzinfo=UTC))
    result = forecast(NOW, Decimal(100), [bought_late, bought_soon, free])
    # Days 0-5: free (500). Days 5-10: "soon" (500 of 1,000), then it ends with 500 left.
    # Days 10-20: "late" (1,000): used up on day 20.
    assert result.depletion_time == NOW + timedelta(days=20)
    assert result.forfeitures == (Forfeiture("soon", soon, 500),)


def test_expiring_first_policy_draws_the_earlier_end_first():
    soon = NOW + timedelta(days=10) - timedelta(seconds=1)
    late = pkg("late", 1_000, effective=datetime(2024, 1, 1, tzinfo=UTC))
    bought_soon = pkg("soon", 1_000, expire=soon, effective=datetime(2024, 2, 1, tzinfo=UTC))
    standard = forecast(NOW, Decimal(100), [late, bought_soon])
    expiring = forecast(NOW, Decimal(100), [late, bought_soon], DeductionPolicy.EXPIRING_FIRST)
    # standard: "late" began first, so it is drawn first and "soon" forfeits everything.
    assert standard.forfeitures == (Forfeiture("soon", soon, 1_000),)
    assert standard.depletion_time == NOW + timedelta(days=10)
    # expiring_first: "soon" is drawn first and used up just as it ends; then "late".
    assert expiring.forfeitures == ()
    assert expiring.depletion_time == NOW + timedelta(days=20)


def test_a_gap_between_packages_is_a_depletion_and_the_later_one_still_counts():
    later_start = NOW + timedelta(days=30)
    first = pkg("first", 200)
    later = pkg(
        "later", 1_000, effective=later_start, expire=later_start + timedelta(days=5, seconds=-1)
    )
    result = forecast(NOW, Decimal(100), [first, later])
    assert result.depletion_time == NOW + timedelta(days=2)
    assert result.forfeitures == (Forfeiture("later", later.expire_time, 500),)


def test_already_used_up_is_depleted_now_and_revoked_or_ended_packages_are_ignored():
    ended = pkg("ended", 1_000, expire=NOW - timedelta(days=1))
    revoked = pkg("revoked", 1_000, revoked=True)
    result = forecast(NOW, Decimal(0), [pkg("done", 10, used=10), ended, revoked])
    assert result.depletion_time == NOW
    assert result.forfeitures == ()
    assert forecast(NOW, Decimal(50), [ended, revoked]) == forecast(NOW, Decimal(50), [])
    assert forecast(NOW, Decimal(50), []).depletion_time is None


def test_depletion_time_is_rounded_up_to_the_second_and_forfeiture_down_to_the_call():
    expire = NOW + timedelta(days=1) - timedelta(seconds=1)
    result = forecast(NOW, Decimal(3), [pkg("p1", 1, expire=expire)])
    # 1 call at 3 a day: 8 hours.
    assert result.depletion_time == NOW + timedelta(hours=8)
    odd = forecast(NOW, Decimal("7"), [pkg("p1", 1)])
    assert odd.depletion_time == NOW + timedelta(seconds=12_343)  # 86400 / 7 = 12342.857...
    partial = forecast(NOW, Decimal("0.5"), [pkg("p1", 10, expire=expire)])
    assert partial.forfeitures == (Forfeiture("p1", expire, 9),)  # 9.5 left: 9


def test_largest_forfeiture_is_the_first_of_the_largest():
    a = NOW + timedelta(days=3)
    b = NOW + timedelta(days=4)
    result = forecast(NOW, Decimal(0), [pkg("a", 10, expire=a), pkg("b", 10, expire=b)])
    assert result.largest_forfeiture() == Forfeiture("a", a, 10)
    assert forecast(NOW, Decimal(0), []).largest_forfeiture() is None


def test_negative_rate_is_refused():
    with pytest.raises(ValueError):
        forecast(NOW, Decimal(-1), [])
