"""The calendar of usage statistics: which bucket an instant falls in, for UTC minutes and
hours and for days of a billing time zone, DST changes and skipped midnights included.

`bucket_of` does in Python what `stats_queries.bucket_start` does in SQL, so these tests pin
the runs the use case hands to the database without one.
"""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.quota.domain.stats import (
    HOUR_US,
    MAX_BUCKETS,
    MINUTE_US,
    BucketRun,
    Granularity,
    bucket_runs,
    local_day_start,
)
from shared.errors import InvalidArgument
from shared.timeutil import from_epoch_us, to_epoch_us

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
MINUTE, HOUR, DAY = Granularity.MINUTE, Granularity.HOUR, Granularity.DAY
H = timedelta(hours=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def bucket_of(instant: datetime, runs: list[BucketRun]) -> datetime:
    """The bucket start `stats_queries.bucket_start` computes for `instant`."""
    us = to_epoch_us(instant)
    run = [r for r in runs if r.start_us <= us][-1]
    return from_epoch_us(run.start_us + (us - run.start_us) // run.width_us * run.width_us)


# --- minutes and hours ---------------------------------------------------------------------


def test_minutes_are_aligned_to_utc():
    runs = bucket_runs(at("2024-01-01T00:00:30Z"), at("2024-01-01T00:05:00Z"), MINUTE, SHANGHAI)

    assert runs == [BucketRun(to_epoch_us(at("2024-01-01T00:00:00Z")), MINUTE_US)]
    assert bucket_of(at("2024-01-01T00:01:59.999999Z"), runs) == at("2024-01-01T00:01:00Z")
    assert bucket_of(at("2024-01-01T00:02:00Z"), runs) == at("2024-01-01T00:02:00Z")


def test_hours_are_aligned_to_utc_not_to_the_billing_time_zone():
    # Kathmandu is UTC+05:45: its local hours would start at :15.
    runs = bucket_runs(
        at("2024-01-01T10:20:00Z"), at("2024-01-01T12:00:00Z"), HOUR, ZoneInfo("Asia/Kathmandu")
    )

    assert runs == [BucketRun(to_epoch_us(at("2024-01-01T10:00:00Z")), HOUR_US)]
    assert bucket_of(at("2024-01-01T11:14:00Z"), runs) == at("2024-01-01T11:00:00Z")


def test_buckets_before_1970_floor_rather_than_truncate():
    runs = bucket_runs(at("1969-12-31T23:30:00Z"), at("1970-01-01T01:00:00Z"), HOUR, SHANGHAI)

    assert from_epoch_us(runs[0].start_us) == at("1969-12-31T23:00:00Z")
    assert bucket_of(at("1969-12-31T23:59:59Z"), runs) == at("1969-12-31T23:00:00Z")


# --- days ----------------------------------------------------------------------------------


def test_shanghai_days_start_at_1600_utc():
    runs = bucket_runs(at("2024-01-01T00:00:00Z"), at("2024-01-03T00:00:00Z"), DAY, SHANGHAI)

    assert runs == [BucketRun(to_epoch_us(at("2023-12-31T16:00:00Z")), 24 * HOUR_US)]
    assert bucket_of(at("2024-01-01T15:59:59Z"), runs) == at("2023-12-31T16:00:00Z")
    assert bucket_of(at("2024-01-01T16:00:00Z"), runs) == at("2024-01-01T16:00:00Z")


def test_new_york_days_last_23_and_25_hours_across_dst():
    start, end = at("2024-03-09T05:00:00Z"), at("2024-11-05T05:00:00Z")
    runs = bucket_runs(start, end, DAY, NEW_YORK)

    assert [(from_epoch_us(r.start_us), r.width_us / HOUR_US) for r in runs] == [
        (at("2024-03-09T05:00:00Z"), 24),
        (at("2024-03-10T05:00:00Z"), 23),
        (at("2024-03-11T04:00:00Z"), 24),
        (at("2024-11-03T04:00:00Z"), 25),
        (at("2024-11-04T05:00:00Z"), 24),
    ]
    # 23:59:59 local on the short day, then its next midnight.
    assert bucket_of(at("2024-03-11T03:59:59Z"), runs) == at("2024-03-10T05:00:00Z")
    assert bucket_of(at("2024-03-11T04:00:00Z"), runs) == at("2024-03-11T04:00:00Z")
    # 23:30 local (EST) at the end of the long day.
    assert bucket_of(at("2024-11-04T04:30:00Z"), runs) == at("2024-11-03T04:00:00Z")


@pytest.mark.parametrize(
    ("zone", "day", "first_instant"),
    [
        # The clocks jump from 23:59:59 to 01:00: the day starts at the jump.
        ("America/Santiago", date(2022, 9, 11), "2022-09-11T04:00:00Z"),
        ("America/Sao_Paulo", date(2018, 11, 4), "2018-11-04T03:00:00Z"),
        # Midnight repeats (Sao Paulo went back from 24:00 to 23:00): the day starts once.
        ("America/Sao_Paulo", date(2019, 2, 17), "2019-02-17T03:00:00Z"),
        ("Asia/Kathmandu", date(2024, 1, 1), "2023-12-31T18:15:00Z"),
        # Samoa skipped 2011-12-30: it starts (and ends) when 2011-12-31 starts.
        ("Pacific/Apia", date(2011, 12, 30), "2011-12-30T10:00:00Z"),
        ("Pacific/Apia", date(2011, 12, 31), "2011-12-30T10:00:00Z"),
    ],
)
def test_first_instant_of_a_local_day(zone, day, first_instant):
    assert local_day_start(day, ZoneInfo(zone)) == at(first_instant)


def test_a_skipped_day_is_no_bucket():
    apia = ZoneInfo("Pacific/Apia")
    runs = bucket_runs(at("2011-12-29T10:00:00Z"), at("2011-12-31T10:00:00Z"), DAY, apia)

    # 2011-12-29 (UTC-10) and 2011-12-31 (UTC+14), 24 hours each, back to back.
    assert runs == [BucketRun(to_epoch_us(at("2011-12-29T10:00:00Z")), 24 * HOUR_US)]
    assert bucket_of(at("2011-12-30T09:59:59Z"), runs) == at("2011-12-29T10:00:00Z")
    assert bucket_of(at("2011-12-30T10:00:00Z"), runs) == at("2011-12-30T10:00:00Z")


ZONES = [
    "Asia/Shanghai",
    "America/New_York",
    "America/Santiago",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",  # half-hour DST
    "Europe/Dublin",  # negative DST in the tz database
    "Asia/Kathmandu",
    "Pacific/Apia",
    "UTC",
]


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    start=st.datetimes(datetime(1995, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC)),
    span=st.timedeltas(timedelta(microseconds=1), timedelta(days=800)),
    where=st.floats(0, 1, exclude_max=True),
)
def test_every_instant_falls_in_the_bucket_of_its_local_day(zone, start, span, where):
    tz = ZoneInfo(zone)
    runs = bucket_runs(start, start + span, DAY, tz)
    instant = start + span * where

    assert from_epoch_us(runs[0].start_us) <= start
    assert bucket_of(instant, runs) == local_day_start(instant.astimezone(tz).date(), tz)


# --- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granularity", "unit"),
    [(MINUTE, timedelta(minutes=1)), (HOUR, H), (DAY, timedelta(days=1))],
)
def test_at_most_max_buckets_per_request(granularity, unit):
    start = at("2023-12-31T16:00:00Z")  # aligned for all three in Shanghai

    bucket_runs(start, start + MAX_BUCKETS * unit, granularity, SHANGHAI)
    with pytest.raises(InvalidArgument) as caught:
        bucket_runs(start, start + MAX_BUCKETS * unit + timedelta(seconds=1), granularity, SHANGHAI)
    assert caught.value.field == "end_time"


def test_a_range_of_centuries_is_refused_without_walking_it():
    with pytest.raises(InvalidArgument) as caught:
        bucket_runs(at("0001-01-02T00:00:00Z"), at("9999-12-31T00:00:00Z"), DAY, SHANGHAI)
    assert caught.value.field == "end_time"


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("9999-12-30T00:00:00Z", "9999-12-31T23:59:59Z", "end_time"),
        ("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z", "start_time"),
    ],
)
def test_days_at_the_ends_of_the_calendar_are_invalid_arguments(start, end, field):
    with pytest.raises(InvalidArgument) as caught:
        bucket_runs(at(start), at(end), DAY, SHANGHAI)
    assert caught.value.field == field
