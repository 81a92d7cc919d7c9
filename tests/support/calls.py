"""What calls to every service share: call metadata, timestamps, and the one check of a call
that must fail (`expect_error`: status code, `ErrorInfo.reason`, `BadRequest` field)."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from allot.testing.v1 import clock_service_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from shared.status import bad_request_fields, error_info

Metadata = tuple[tuple[str, str], ...]


def ts(value: datetime | str) -> timestamp_pb2.Timestamp:
    """A Timestamp of an aware datetime or an RFC 3339 string."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


class ServiceCalls:
    """What the calls helpers of every service share (`QuotaCalls`, `BillingCalls`,
    `NotificationCalls`): its `tokens`, the admin's metadata, an account's, and the manual clock
    the service serves in tests (`clock`, a ClockService stub). A subclass sets `tokens`, `clock`
    and `admin`; `CLOCK_TIMEOUT` bounds a clock call whose due work runs before it returns."""

    tokens: Any
    clock: Any
    admin: Metadata
    CLOCK_TIMEOUT: float | None = None

    def account(self, account_id: str, read_only: bool = False) -> Metadata:
        return self.tokens.md(self.tokens.account(account_id, read_only=read_only))

    async def set_time(self, value: datetime | str) -> None:
        """Move the service's manual clock; due work runs before this returns."""
        await self.clock.SetTime(
            clock_service_pb2.SetTimeRequest(time=ts(value)),
            metadata=self.admin,
            timeout=self.CLOCK_TIMEOUT,
        )

    async def advance(self, delta: timedelta = timedelta(0)) -> None:
        """Move the service's manual clock on by `delta`; due work runs before this returns."""
        duration = duration_pb2.Duration()
        duration.FromTimedelta(delta)
        await self.clock.AdvanceTime(
            clock_service_pb2.AdvanceTimeRequest(duration=duration),
            metadata=self.admin,
            timeout=self.CLOCK_TIMEOUT,
        )


async def expect_error(
    call: Awaitable,
    code: grpc.StatusCode,
    reason: str | None = None,
    field: str | None = None,
) -> grpc.aio.AioRpcError:
    """Await a call that must fail with `code` and, when given, ErrorInfo `reason` (domain
    `allot`) and `field`, the one field BadRequest names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    if reason is not None:
        info = error_info(error)
        assert info is not None, f"no ErrorInfo in {error.code()}: {error.details()}"
        assert (info.domain, info.reason) == ("allot", reason), error.details()
    if field is not None:
        assert bad_request_fields(error) == [field], error.details()
    return error


def status_details(status: status_pb2.Status) -> tuple[str, list[str]]:
    """(ErrorInfo.reason, BadRequest fields) of a `google.rpc.Status` carried as data."""
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return reason, fields
