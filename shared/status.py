"""The error table: domain errors -> gRPC status with `ErrorInfo` and `BadRequest` details.

Unknown exceptions become INTERNAL with a generic message and a correlation id that is logged
with the traceback, so nothing internal leaks to callers and operators can still find it.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from shared.errors import AllotError

DOMAIN = "allot"
log = logging.getLogger("allot.errors")


def to_status(error: AllotError) -> status_pb2.Status:
    """The `google.rpc.Status` of a domain error."""
    code = getattr(grpc.StatusCode, error.kind.value)
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    details.append(info)
    if error.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message
                    )
                ]
            )
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=error.message, details=packed)


def internal_status(exc: BaseException) -> status_pb2.Status:
    correlation_id = uuid.uuid4().hex
    log.error("internal error %s", correlation_id, exc_info=exc)
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=DOMAIN, metadata={"correlation_id": correlation_id}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (correlation id {correlation_id})",
        details=[detail],
    )


def status_of(exc: BaseException) -> status_pb2.Status:
    """Any exception as a status: typed ones by the table, the rest as INTERNAL."""
    if isinstance(exc, AllotError):
        return to_status(exc)
    return internal_status(exc)


async def abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """End the call with `status`, its details in `grpc-status-details-bin` (grpcio-status),
    keeping the trailing metadata set before (the request id echoed to the caller)."""
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    await context.abort(
        code,
        status.message,
        trailing_metadata=(
            *(context.trailing_metadata() or ()),
            ("grpc-status-details-bin", status.SerializeToString()),
        ),
    )


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call (for clients and tests)."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(rpc_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bad_request_fields(rpc_error: grpc.RpcError) -> list[str]:
    """Field names of a failed call's BadRequest detail."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(rpc_error)
    fields: list[str] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields
