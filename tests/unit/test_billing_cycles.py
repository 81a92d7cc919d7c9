"""The billing calendar (docs/design/time.md): hourly cycles by occur_time, months, local time."""

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.cycles import (
    cycle_due,
    cycle_end,
    cycle_start,
    month_bounds,
    month_key,
    parse_month,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
PLUS_8 = timezone(timedelta(hours=8))
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
HOUR = timedelta(hours=1)


def local(*args, tz=PLUS_8):
    return datetime(*args, tzinfo=tz)


def test_calls_at_0845_to_0855_form_one_cycle_0800_to_0900():
    calls = [local(2024, 5, 1, 8, minute) for minute in (45, 47, 50, 53, 55)]

    starts = {cycle_start(t, SHANGHAI) for t in calls}

    assert starts == {local(2024, 5, 1, 8, 0)}
    (start,) = starts
    assert cycle_end(start, SHANGHAI) == local(2024, 5, 1, 9, 0)
    assert start.tzinfo is UTC


def test_calls_at_095950_and_100010_fall_in_two_cycles():
    first = cycle_start(local(2024, 5, 1, 9, 59, 50), SHANGHAI)
    second = cycle_start(local(2024, 5, 1, 10, 0, 10), SHANGHAI)

    assert first == local(2024, 5, 1, 9, 0)
    assert second == local(2024, 5, 1, 10, 0)
    assert cycle_end(first, SHANGHAI) == second


def test_pay_per_use_from_152916_to_163029_spans_the_cycles_1500_and_1600():
    # The example: pay-per-use since 15:29:16, a package bought at 16:30:30.
    calls = [local(2024, 5, 1, 15, 29, 16) + k * timedelta(minutes=1) for k in range(62)]
    assert calls[-1] < local(2024, 5, 1, 16, 30, 30)

    starts = sorted({cycle_start(t, SHANGHAI) for t in calls})

    assert starts == [local(2024, 5, 1, 15, 0), local(2024, 5, 1, 16, 0)]


def test_the_top_of_the_hour_belongs_to_the_cycle_it_starts():
    assert cycle_start(local(2024, 5, 1, 9, 0), SHANGHAI) == local(2024, 5, 1, 9, 0)
    assert cycle_start(local(2024, 5, 1, 8, 59, 59, 999_999), SHANGHAI) == local(2024, 5, 1, 8, 0)


def test_a_cycle_is_due_once_it_has_ended():
    start = local(2024, 5, 1, 8, 0)

    assert not cycle_due(start, local(2024, 5, 1, 8, 59, 59, 999_999), SHANGHAI)
    assert cycle_due(start, local(2024, 5, 1, 9, 0), SHANGHAI)
    assert cycle_due(start, local(2024, 5, 2, 0, 0), SHANGHAI)


def test_in_a_whole_hour_zone_cycles_are_utc_hours():
    t = datetime(2024, 5, 1, 3, 17, 5, tzinfo=UTC)
    assert cycle_start(t, SHANGHAI) == datetime(2024, 5, 1, 3, 0, tzinfo=UTC)


def test_in_a_half_hour_zone_cycles_are_local_hours():
    start = cycle_start(local(2024, 5, 1, 10, 15, tz=KOLKATA), KOLKATA)

    assert start == local(2024, 5, 1, 10, 0, tz=KOLKATA)
    assert start == datetime(2024, 5, 1, 4, 30, tzinfo=UTC)
    assert cycle_end(start, KOLKATA) == datetime(2024, 5, 1, 5, 30, tzinfo=UTC)


def test_when_the_clocks_fall_back_the_repeated_hour_is_two_cycles():
    # New York, 2024-11-03: 01:00-02:00 local happens at 05:00-06:00 and 06:00-07:00 UTC.
    first = cycle_start(datetime(2024, 11, 3, 5, 30, tzinfo=UTC), NEW_YORK)
    second = cycle_start(datetime(2024, 11, 3, 6, 30, tzinfo=UTC), NEW_YORK)

    assert first == datetime(2024, 11, 3, 5, 0, tzinfo=UTC)
    assert second == datetime(2024, 11, 3, 6, 0, tzinfo=UTC)
    assert cycle_end(first, NEW_YORK) == second
    assert cycle_end(second, NEW_YORK) == datetime(2024, 11, 3, 7, 0, tzinfo=UTC)


def test_when_the_clocks_spring_forward_cycles_stay_contiguous():
    # New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT at 07:00 UTC.
    start = cycle_start(datetime(2024, 3, 10, 6, 30, tzinfo=UTC), NEW_YORK)

    assert start == datetime(2024, 3, 10, 6, 0, tzinfo=UTC)  # 01:00 EST
    assert cycle_end(start, NEW_YORK) == datetime(2024, 3, 10, 7, 0, tzinfo=UTC)  # 03:00 EDT


def test_a_half_hour_change_of_the_clocks_makes_a_short_cycle():
    # Lord Howe Island, 2024-10-06: 02:00 (+10:30) jumps to 02:30 (+11:00) at 15:30 UTC.
    before = cycle_start(datetime(2024, 10, 5, 15, 15, tzinfo=UTC), LORD_HOWE)
    after = cycle_start(datetime(2024, 10, 5, 15, 45, tzinfo=UTC), LORD_HOWE)

    assert before == datetime(2024, 10, 5, 14, 30, tzinfo=UTC)  # 01:00 local
    assert cycle_end(before, LORD_HOWE) == datetime(2024, 10, 5, 15, 30, tzinfo=UTC)
    assert after == datetime(2024, 10, 5, 15, 30, tzinfo=UTC)  # 02:30 local
    assert cycle_end(after, LORD_HOWE) == datetime(2024, 10, 5, 16, 0, tzinfo=UTC)  # 03:00


def test_month_key_is_the_month_in_the_billing_time_zone():
    assert month_key(datetime(2024, 4, 30, 15, 59, 59, tzinfo=UTC), SHANGHAI) == "2024-04"
    assert month_key(datetime(2024, 4, 30, 16, 0, tzinfo=UTC), SHANGHAI) == "2024-05"
    assert month_key(datetime(2024, 4, 30, 16, 0, tzinfo=UTC), UTC) == "2024-04"


def test_month_bounds_in_the_billing_time_zone():
    assert month_bounds("2024-05", SHANGHAI) == (
        datetime(2024, 4, 30, 16, 0, tzinfo=UTC),
        datetime(2024, 5, 31, 16, 0, tzinfo=UTC),
    )
    assert month_bounds("2024-12", SHANGHAI) == (
        datetime(2024, 11, 30, 16, 0, tzinfo=UTC),
        datetime(2024, 12, 31, 16, 0, tzinfo=UTC),
    )
    assert month_bounds("2024-02", UTC)[1] - month_bounds("2024-02", UTC)[0] == timedelta(days=29)


def test_a_month_whose_first_midnight_was_skipped_starts_when_its_first_day_does():
    # Asunción skipped 2023-10-01 00:00-01:00 (-04:00 -> -03:00 at 04:00 UTC).
    asuncion = ZoneInfo("America/Asuncion")

    start, _ = month_bounds("2023-10", asuncion)

    assert start == datetime(2023, 10, 1, 4, 0, tzinfo=UTC)
    assert month_bounds("2023-09", asuncion)[1] == start
    assert month_key(start, asuncion) == "2023-10"
    assert month_key(start - timedelta(microseconds=1), asuncion) == "2023-09"


@pytest.mark.parametrize("month", ["2024-5", "2024-13", "2024-00", "0000-01", "24-05", "", None])
def test_malformed_months_are_refused(month):
    with pytest.raises(ValueError):
        parse_month(month)
    with pytest.raises(ValueError):
        month_bounds(month, SHANGHAI)


def test_parse_month():
    assert parse_month("2024-05") == (2024, 5)


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        cycle_start(datetime(2024, 5, 1, 8, 45), SHANGHAI)


# --- properties: cycles tile time in every kind of zone --------------------------------------

ZONES = [
    ZoneInfo(name)
    for name in (
        "Asia/Shanghai",
        "UTC",
        "America/New_York",
        "Europe/London",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "America/Santiago",
        "America/Asuncion",
    )
]
instants = st.datetimes(
    min_value=datetime(2023, 1, 1), max_value=datetime(2025, 12, 31), timezones=st.just(UTC)
)


@given(instants, st.sampled_from(ZONES))
def test_every_instant_lies_in_exactly_one_cycle_of_at_most_an_hour(t, tz):
    start = cycle_start(t, tz)
    end = cycle_end(start, tz)

    assert start <= t < end
    assert timedelta(0) < end - start <= HOUR
    assert cycle_start(start, tz) == start  # a start is its own cycle's start
    assert cycle_start(end, tz) == end  # the next cycle starts where this one ends
    assert cycle_end(t, tz) == end
    # A cycle never straddles a month, so its calls share one tier count.
    assert month_key(start, tz) == month_key(end - timedelta(microseconds=1), tz)


@given(instants, st.sampled_from(ZONES))
def test_every_instant_lies_in_its_month(t, tz):
    start, end = month_bounds(month_key(t, tz), tz)
    assert start <= t < end


def _offset_changes(tz, year=2024):
    """Instants (to the hour) just after which the zone's UTC offset changes, in ``year``."""
    t = datetime(year, 1, 1, tzinfo=UTC)
    changes = []
    while t.year == year:
        if (t + HOUR).astimezone(tz).utcoffset() != t.astimezone(tz).utcoffset():
            changes.append((tz, t))
        t += HOUR
    return changes


NEAR_CHANGES = [change for tz in ZONES for change in _offset_changes(tz)]


@given(st.sampled_from(NEAR_CHANGES), st.integers(-3 * 3600, 4 * 3600))
def test_cycles_tile_time_around_changes_of_the_clocks(change, seconds):
    tz, around = change
    t = around + timedelta(seconds=seconds)
    start = cycle_start(t, tz)
    end = cycle_end(start, tz)

    assert start <= t < end
    assert timedelta(0) < end - start <= HOUR
    assert cycle_start(end, tz) == end
    assert cycle_start(start - timedelta(microseconds=1), tz) < start
    assert cycle_end(start - timedelta(microseconds=1), tz) == start
    assert month_key(start, tz) == month_key(end - timedelta(microseconds=1), tz)
