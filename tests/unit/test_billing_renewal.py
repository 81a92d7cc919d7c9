"""Renewal (docs/design/billing.md): the manual renewal window and the auto-renewal schedule."""

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from services.billing.domain.renewal import (
    DEFAULT_LEAD_DAYS,
    first_attempt,
    forfeits_remainder,
    next_attempt,
    renewal_allowed,
    renewal_window_end,
    renewed_expire_time,
)
from shared.validity import package_expire_time

SHANGHAI = ZoneInfo("Asia/Shanghai")
PLUS_8 = timezone(timedelta(hours=8))
EXPIRE = datetime(2024, 4, 19, 23, 59, 59, tzinfo=PLUS_8)  # the last covered second


def local(*args):
    return datetime(*args, tzinfo=PLUS_8)


def test_manual_renewal_is_allowed_until_expiry_and_15_days_after():
    assert renewal_allowed(EXPIRE, local(2023, 4, 19, 14, 25, 10))
    assert renewal_allowed(EXPIRE, EXPIRE)
    assert renewal_allowed(EXPIRE, local(2024, 4, 20, 0, 0))
    assert renewal_allowed(EXPIRE, local(2024, 5, 4, 23, 59, 59, 999_999))
    assert not renewal_allowed(EXPIRE, local(2024, 5, 5, 0, 0))
    assert renewal_window_end(EXPIRE) == local(2024, 5, 5, 0, 0)


def test_renewing_after_expiry_forfeits_the_old_remainder():
    assert not forfeits_remainder(EXPIRE, EXPIRE)
    assert not forfeits_remainder(EXPIRE, EXPIRE + timedelta(milliseconds=999))
    assert forfeits_remainder(EXPIRE, local(2024, 4, 20, 0, 0))


def test_renewal_extends_from_the_original_expiry_even_after_it():
    # Bought 2023-04-19 14:25:10 for a year: valid to 2024-04-19 23:59:59; renewed, to 2025.
    bought = package_expire_time(local(2023, 4, 19, 14, 25, 10), 12, SHANGHAI)
    assert bought == EXPIRE

    assert renewed_expire_time(EXPIRE, 12, 1, SHANGHAI) == local(2025, 4, 19, 23, 59, 59)
    assert renewed_expire_time(EXPIRE, 12, 2, SHANGHAI) == local(2026, 4, 19, 23, 59, 59)
    assert renewed_expire_time(EXPIRE, 1, 3, SHANGHAI) == local(2024, 7, 19, 23, 59, 59)


def test_renewal_from_29_february_ends_on_28_february():
    leap = local(2024, 2, 29, 23, 59, 59)
    assert renewed_expire_time(leap, 12, 1, SHANGHAI) == local(2025, 2, 28, 23, 59, 59)


@pytest.mark.parametrize("periods", [0, -1])
def test_at_least_one_period_is_renewed(periods):
    with pytest.raises(ValueError):
        renewed_expire_time(EXPIRE, 12, periods, SHANGHAI)


def test_periods_must_be_an_int():
    with pytest.raises(TypeError):
        renewed_expire_time(EXPIRE, 12, 1.0, SHANGHAI)


def test_auto_renewal_first_attempt_is_0300_seven_days_before_expiry():
    attempt = first_attempt(EXPIRE, DEFAULT_LEAD_DAYS, SHANGHAI)

    assert DEFAULT_LEAD_DAYS == 7
    assert attempt == local(2024, 4, 12, 3, 0)
    assert attempt.tzinfo is UTC


def test_the_lead_is_configurable():
    assert first_attempt(EXPIRE, 1, SHANGHAI) == local(2024, 4, 18, 3, 0)
    assert first_attempt(EXPIRE, 0, SHANGHAI) == local(2024, 4, 19, 3, 0)
    assert first_attempt(EXPIRE, 30, SHANGHAI) == local(2024, 3, 20, 3, 0)
    with pytest.raises(ValueError):
        first_attempt(EXPIRE, -1, SHANGHAI)


def test_failed_attempts_are_retried_daily_at_0300_until_expiry():
    attempts = [first_attempt(EXPIRE, 7, SHANGHAI)]
    while (following := next_attempt(attempts[-1], EXPIRE, SHANGHAI)) is not None:
        attempts.append(following)

    assert attempts == [local(2024, 4, day, 3, 0) for day in range(12, 20)]


def test_success_renews_to_2025_04_19_235959():
    attempt = first_attempt(EXPIRE, 7, SHANGHAI)
    assert renewal_allowed(EXPIRE, attempt)

    renewed = renewed_expire_time(EXPIRE, 12, 1, SHANGHAI)

    assert renewed == local(2025, 4, 19, 23, 59, 59)
    assert first_attempt(renewed, 7, SHANGHAI) == local(2025, 4, 12, 3, 0)


def test_after_a_late_attempt_the_next_is_0300_the_next_day():
    assert next_attempt(local(2024, 4, 15, 14, 0), EXPIRE, SHANGHAI) == local(2024, 4, 16, 3, 0)
    assert next_attempt(local(2024, 4, 15, 0, 30), EXPIRE, SHANGHAI) == local(2024, 4, 16, 3, 0)


def test_no_attempt_on_or_after_expiry():
    assert next_attempt(local(2024, 4, 19, 3, 0), EXPIRE, SHANGHAI) is None
    # An expiry before 03:00 on its day leaves nothing to attempt that day.
    early = local(2024, 4, 19, 2, 0)
    assert first_attempt(early, 0, SHANGHAI) is None
    assert first_attempt(early, 1, SHANGHAI) == local(2024, 4, 18, 3, 0)


def test_the_schedule_follows_the_billing_time_zone():
    expire = datetime(2024, 4, 19, 23, 59, 59, tzinfo=UTC)
    assert first_attempt(expire, 7, UTC) == datetime(2024, 4, 12, 3, 0, tzinfo=UTC)
    # The same instant is 2024-04-20 07:59:59 in Shanghai: its own date counts there.
    assert first_attempt(expire, 7, SHANGHAI) == local(2024, 4, 13, 3, 0)


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        renewal_allowed(datetime(2024, 4, 19, 23, 59, 59), EXPIRE)
