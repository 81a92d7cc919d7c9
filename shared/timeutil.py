"""Instants as integer microseconds (storage) and protobuf Timestamps (wire), always UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from shared.errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Timestamp's own valid range (0001-01-01 .. 9999-12-31), in seconds.
MIN_SECONDS = -62135596800
MAX_SECONDS = 253402300799


def to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    delta = value - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    micros = to_micros(value)
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def from_timestamp(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A wire timestamp as an aware datetime; out-of-range values name the field."""
    if not MIN_SECONDS <= ts.seconds <= MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(field, f"{field} is not a valid timestamp")
    # Microsecond precision is what we store; sub-microsecond digits are dropped.
    return EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def from_duration(d: duration_pb2.Duration, field: str) -> timedelta:
    if not -315576000000 <= d.seconds <= 315576000000 or abs(d.nanos) >= 1_000_000_000:
        raise InvalidArgument(field, f"{field} is not a valid duration")
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)
