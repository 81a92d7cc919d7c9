"""Validity periods of packages (docs/design/time.md): where a package bought for N months ends."""

from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from services.quota.domain.packages import Package, PackageSource, PackageState
from shared.validity import (
    add_months,
    as_utc,
    package_expire_time,
    renewal_expire_time,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
PLUS_8 = timezone(timedelta(hours=8))


def _package(effective: datetime, expire: datetime) -> Package:
    return Package(
        package_id="p1",
        account_id="acct",
        region="ap-southeast-1",
        api="passport",
        enterprise_project_id="",
        source=PackageSource.SUBSCRIPTION,
        total_quantity=100_000,
        used_quantity=0,
        effective_time=effective,
        expire_time=expire,
        create_time=effective,
    )


def test_one_year_package_bought_afternoon_ends_at_235959_local_a_year_later():
    start = datetime(2023, 4, 19, 14, 25, 10, tzinfo=PLUS_8)

    expire = package_expire_time(start, 12, SHANGHAI)

    assert expire == datetime(2024, 4, 19, 23, 59, 59, tzinfo=PLUS_8)
    assert expire == datetime(2024, 4, 19, 15, 59, 59, tzinfo=UTC)
    assert expire.tzinfo is UTC


def test_last_second_is_covered_and_the_next_day_is_not():
    start = datetime(2023, 4, 19, 14, 25, 10, tzinfo=PLUS_8)
    package = _package(start, package_expire_time(start, 12, SHANGHAI))

    last_second = datetime(2024, 4, 19, 23, 59, 59, tzinfo=PLUS_8)
    assert package.covers(last_second)
    assert package.covers(last_second + timedelta(milliseconds=999))
    assert package.state_at(last_second) is PackageState.ACTIVE

    next_day = datetime(2024, 4, 20, 0, 0, 0, tzinfo=PLUS_8)
    assert not package.covers(next_day)
    assert package.state_at(next_day) is PackageState.EXPIRED


def test_the_start_counts_from_its_local_date_in_the_billing_zone():
    # 17:30 UTC on 19 April is already 20 April in Shanghai.
    start = datetime(2023, 4, 19, 17, 30, tzinfo=UTC)

    assert package_expire_time(start, 12, SHANGHAI) == datetime(
        2024, 4, 20, 23, 59, 59, tzinfo=PLUS_8
    )


def test_bought_on_29_february_expires_on_28_february():
    start = datetime(2024, 2, 29, 9, 0, tzinfo=PLUS_8)

    assert package_expire_time(start, 12, SHANGHAI) == datetime(
        2025, 2, 28, 23, 59, 59, tzinfo=PLUS_8
    )


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (date(2024, 1, 31), 1, date(2024, 2, 29)),
        (date(2023, 1, 31), 1, date(2023, 2, 28)),
        (date(2024, 2, 29), 12, date(2025, 2, 28)),
        (date(2024, 2, 29), 48, date(2028, 2, 29)),
        (date(2024, 3, 31), 1, date(2024, 4, 30)),
        (date(2024, 8, 31), 1, date(2024, 9, 30)),
        (date(2024, 11, 30), 3, date(2025, 2, 28)),
        (date(2024, 12, 15), 1, date(2025, 1, 15)),
        (date(2024, 5, 15), 0, date(2024, 5, 15)),
        (date(2024, 3, 31), -1, date(2024, 2, 29)),
    ],
)
def test_add_months_clamps_to_the_last_day_of_the_target_month(start, months, expected):
    assert add_months(start, months) == expected


def test_month_end_purchase_is_clamped_in_a_short_month():
    start = datetime(2024, 1, 31, 10, 0, tzinfo=PLUS_8)

    assert package_expire_time(start, 1, SHANGHAI) == datetime(
        2024, 2, 29, 23, 59, 59, tzinfo=PLUS_8
    )


def test_end_of_day_follows_the_local_offset_across_daylight_saving_time():
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2024, 1, 10, 12, 0, tzinfo=berlin)  # winter, UTC+1

    expire = package_expire_time(start, 6, berlin)  # summer, UTC+2

    assert expire.astimezone(berlin).replace(tzinfo=None) == datetime(2024, 7, 10, 23, 59, 59)
    assert expire == datetime(2024, 7, 10, 21, 59, 59, tzinfo=UTC)


def test_renewal_extends_from_the_current_expiry_date():
    current = datetime(2024, 4, 19, 23, 59, 59, tzinfo=PLUS_8)

    assert renewal_expire_time(current, 12, SHANGHAI) == datetime(
        2025, 4, 19, 23, 59, 59, tzinfo=PLUS_8
    )
    assert renewal_expire_time(datetime(2024, 2, 29, 23, 59, 59, tzinfo=PLUS_8), 12, SHANGHAI) == (
        datetime(2025, 2, 28, 23, 59, 59, tzinfo=PLUS_8)
    )


def test_naive_datetimes_are_rejected():
    naive = datetime(2023, 4, 19, 14, 25, 10)

    with pytest.raises(ValueError, match="timezone-aware"):
        package_expire_time(naive, 12, SHANGHAI)
    with pytest.raises(ValueError, match="timezone-aware"):
        renewal_expire_time(naive, 12, SHANGHAI)
    with pytest.raises(ValueError, match="timezone-aware"):
        as_utc(naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        _package(naive, naive + timedelta(days=1))
    aware = datetime(2023, 4, 19, tzinfo=UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        _package(aware, aware).covers(naive)


@pytest.mark.parametrize("months", [0, -1])
def test_a_validity_period_is_at_least_one_month(months):
    with pytest.raises(ValueError, match="at least one month"):
        package_expire_time(datetime(2023, 4, 19, tzinfo=UTC), months, SHANGHAI)
