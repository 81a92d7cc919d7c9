"""The bounds of accepted input, where they live (docs/security.md, "Hostile input")."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from allot.notification.v1 import notification_pb2, notification_service_pb2
from allot.quota.v1 import quota_service_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.cycles import parse_month
from shared.errors import InvalidArgument
from shared.money import MAX_AMOUNT_MICROS, from_wire, to_wire
from shared.timeutil import MAX_TIME, MIN_TIME, check_time, from_duration, from_timestamp
from shared.validation import check_strings
from shared.validity import (
    ValidityOutOfRange,
    package_expire_time,
    renewal_expire_time,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (-62135596800, 0),  # 0001-01-01
        (946684799, 999_999_999),  # the last instant of 1999
        (221845392000, 0),  # 9000-01-01
        (253402300799, 0),  # 9999-12-31T23:59:59
        (1704067200, -1),
        (1704067200, 1_000_000_000),
    ],
)
def test_timestamps_outside_2000_to_9000_name_the_field(seconds, nanos):
    with pytest.raises(InvalidArgument) as caught:
        from_timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "expire_time")
    assert caught.value.metadata["field"] == "expire_time"


def test_the_ends_of_the_range():
    assert from_timestamp(timestamp_pb2.Timestamp(seconds=946684800), "t") == MIN_TIME
    last = from_timestamp(timestamp_pb2.Timestamp(seconds=221845391999, nanos=999_999_999), "t")
    assert last < MAX_TIME
    assert check_time(MIN_TIME, "t") == MIN_TIME
    with pytest.raises(InvalidArgument):
        check_time(MAX_TIME, "t")


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(315576000000, 0), (-3155760001, 0), (5, -1), (0, 1_000_000_000)]
)
def test_durations_beyond_100_years_or_mixed_signs_name_the_field(seconds, nanos):
    with pytest.raises(InvalidArgument) as caught:
        from_duration(duration_pb2.Duration(seconds=seconds, nanos=nanos), "grace_period")
    assert caught.value.metadata["field"] == "grace_period"


@pytest.mark.parametrize(
    ("units", "nanos"),
    [
        (2**63 - 1, 0),
        (-(2**63), 0),
        (10**12, 1000),
        (1, -1000),
        (-1, 1000),
        (0, 1_000_000_000),
        (0, 1),  # finer than a micro-unit
    ],
)
def test_money_out_of_bounds_names_the_field(units, nanos):
    with pytest.raises(InvalidArgument) as caught:
        from_wire(units, nanos, "amount")
    assert caught.value.metadata["field"] == "amount"


@given(st.integers(-MAX_AMOUNT_MICROS, MAX_AMOUNT_MICROS))
def test_money_round_trips_through_the_wire_exactly(micros):
    units, nanos = to_wire(micros)
    assert units * nanos >= 0 and abs(nanos) < 1_000_000_000
    assert from_wire(units, nanos, "amount") == micros


@pytest.mark.parametrize(
    "month", ["9999-12", "0000-01", "1999-12", "9000-01", "٢٠٢٤-٠١", "２０２４-０１", "2024-01\n"]
)
def test_months_are_ascii_and_in_range(month):
    with pytest.raises(ValueError):
        parse_month(month)


def test_months_at_the_ends_of_the_range():
    assert parse_month("2000-01") == (2000, 1)
    assert parse_month("8999-12") == (8999, 12)


def test_a_validity_past_9000_is_out_of_range():
    start = datetime(8999, 6, 1, tzinfo=UTC)
    with pytest.raises(ValidityOutOfRange):
        package_expire_time(start, 12, SHANGHAI)
    with pytest.raises(ValidityOutOfRange):
        renewal_expire_time(datetime(8999, 12, 31, tzinfo=UTC), 1, SHANGHAI)
    assert package_expire_time(start, 6, SHANGHAI) < MAX_TIME


def test_a_nul_character_is_refused_in_any_string_field_named_by_its_path():
    """`check_strings` (every request, shared/interceptors.py) walks string fields, singular
    messages inside (a contact inside its request) and repeated strings (by index); repeated
    messages are left to their own slots (a batch's items)."""
    fine = notification_service_pb2.CreateContactRequest(
        request_id="r", contact=notification_pb2.Contact(account_id="a", address="x@example.com")
    )
    check_strings(fine)
    nested = notification_service_pb2.CreateContactRequest(
        contact=notification_pb2.Contact(address="x\x00@example.com")
    )
    with pytest.raises(InvalidArgument) as raised:
        check_strings(nested)
    assert raised.value.field == "contact.address"
    repeated = quota_service_pb2.WatchEventsRequest(event_types=["a", "b", "c\x00"])
    with pytest.raises(InvalidArgument) as raised:
        check_strings(repeated)
    assert raised.value.field == "event_types[2]"
    batch = quota_service_pb2.BatchReportUsageRequest(
        requests=[quota_service_pb2.ReportUsageRequest(event_id="e\x00")]
    )
    check_strings(batch)  # each item is checked in its own slot
