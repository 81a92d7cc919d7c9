"""Instants as integer microseconds (storage) and protobuf Timestamps (wire), always UTC.

Every instant the suite accepts or computes lies in ``[MIN_TIME, MAX_TIME)``, 2000-01-01 to
9000-01-01 UTC (docs/security.md, "Hostile input"): far enough from the ends of Python's
``datetime`` (years 1-9999) that adding a validity period, a grace period or a time zone offset
to an accepted instant cannot overflow, and an instant outside it is ``INVALID_ARGUMENT`` naming
the field. Durations are accepted up to ``MAX_DURATION`` (100 years) either way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from shared.errors import InvalidArgument

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The instants the suite accepts: [MIN_TIME, MAX_TIME) (docs/security.md, "Hostile input").
MIN_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9000, 1, 1, tzinfo=UTC)
MIN_SECONDS = int((MIN_TIME - EPOCH).total_seconds())
MAX_SECONDS = int((MAX_TIME - EPOCH).total_seconds())
MAX_DURATION = timedelta(days=36525)  # 100 years
_RANGE_TEXT = "between 2000-01-01T00:00:00Z and 9000-01-01T00:00:00Z"


def to_epoch_us(value: datetime) -> int:
    """Microseconds since the Unix epoch: how instants are stored (columns named `*_us`).
    Not to be confused with money's micro-units (`shared.money.to_micros`)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    delta = value - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    micros = to_epoch_us(value)
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def from_timestamp(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A wire timestamp as an aware datetime; outside [MIN_TIME, MAX_TIME) names the field."""
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(field, f"{field} is not a valid timestamp (nanos out of range)")
    if not MIN_SECONDS <= ts.seconds < MAX_SECONDS:
        raise InvalidArgument(field, f"{field} must lie {_RANGE_TEXT}")
    # Microsecond precision is what we store; sub-microsecond digits are dropped.
    return EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def check_time(value: datetime, field: str) -> datetime:
    """``value`` if it lies in [MIN_TIME, MAX_TIME), else INVALID_ARGUMENT naming ``field``.

    For instants computed from accepted ones (a renewal's new expiry, a grace period's end).
    """
    if not MIN_TIME <= value < MAX_TIME:
        raise InvalidArgument(
            field, f"{field} would lie outside the supported range ({_RANGE_TEXT})"
        )
    return value


def from_duration(d: duration_pb2.Duration, field: str) -> timedelta:
    """A wire duration as a timedelta; longer than MAX_DURATION either way names the field."""
    if abs(d.nanos) >= 1_000_000_000 or (
        d.seconds and d.nanos and (d.seconds > 0) != (d.nanos > 0)
    ):
        raise InvalidArgument(field, f"{field} is not a valid duration")
    limit = int(MAX_DURATION.total_seconds())
    if not -limit <= d.seconds <= limit:
        raise InvalidArgument(field, f"{field} must be at most 100 years either way")
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)
