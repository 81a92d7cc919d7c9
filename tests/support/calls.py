"""What calls to every service share: call metadata, timestamps, and the one check of a call
that must fail (`expect_error`: status code, `ErrorInfo.reason`, `BadRequest` field)."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2
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
