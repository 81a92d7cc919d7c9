"""A small helper for calling Allot from Python: tokens, retries and error details.

The stubs are the generated `allot.<service>.v1` modules of this distribution::

    import grpc
    from allot.quota.v1 import quota_service_pb2 as qs, quota_service_pb2_grpc as qs_grpc
    import allot_client

    async with allot_client.insecure_channel("localhost:50051") as channel:
        stub = qs_grpc.QuotaServiceStub(channel)
        try:
            await stub.ReportUsage(request, metadata=allot_client.bearer(token), timeout=5)
        except grpc.aio.AioRpcError as error:
            info = allot_client.error_info(error)  # google.rpc.ErrorInfo: reason, metadata

Every call should carry a deadline (`timeout=`). Retries: the channel's service config retries
UNAVAILABLE only, resending the same request; every mutation carries a `request_id`, so a
retried mutation is applied once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "DOMAIN",
    "bad_request_fields",
    "bearer",
    "channel_options",
    "error_info",
    "insecure_channel",
    "secure_channel",
    "service_config",
    "status",
]

DOMAIN = "allot"  # ErrorInfo.domain of every error Allot raises
STATUS_DETAILS_KEY = "grpc-status-details-bin"
SERVICES = (
    "allot.quota.v1.QuotaService",
    "allot.billing.v1.BillingService",
    "allot.notification.v1.NotificationService",
    "grpc.health.v1.Health",
)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an access token (`authorization: Bearer <token>`). Works on
    plaintext and TLS channels alike; on TLS `grpc.access_token_call_credentials` does too."""
    if not token:
        raise ValueError("token is empty")
    return (("authorization", f"Bearer {token}"),)


def service_config(
    *,
    max_attempts: int = 4,
    initial_backoff: float = 0.1,
    max_backoff: float = 2.0,
    retryable: Sequence[str] = ("UNAVAILABLE",),
) -> str:
    """The gRPC service config (JSON) retrying every Allot method on `retryable` codes with
    exponential back-off. gRPC caps `max_attempts` at 5."""
    if not 2 <= max_attempts <= 5:
        raise ValueError("max_attempts must be between 2 and 5")
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": name} for name in SERVICES],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": f"{initial_backoff}s",
                        "maxBackoff": f"{max_backoff}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": list(retryable),
                    },
                }
            ]
        }
    )


def channel_options(*, retries: bool = True, **retry: object) -> list[tuple[str, object]]:
    """Channel options: retries through the service config (`retries=False` turns them off;
    other keywords go to `service_config`)."""
    if not retries:
        return [("grpc.enable_retries", 0)]
    return [("grpc.enable_retries", 1), ("grpc.service_config", service_config(**retry))]


def insecure_channel(target: str, *, retries: bool = True, **retry: object) -> grpc.aio.Channel:
    """A plaintext asyncio channel (development, or behind a mesh that terminates TLS)."""
    return grpc.aio.insecure_channel(target, options=channel_options(retries=retries, **retry))


def secure_channel(
    target: str,
    *,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    retries: bool = True,
    **retry: object,
) -> grpc.aio.Channel:
    """A TLS asyncio channel; a client certificate when the service requires mTLS."""
    credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return grpc.aio.secure_channel(
        target, credentials, options=channel_options(retries=retries, **retry)
    )


def status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` a failed call carries in its trailing metadata, if any."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The `google.rpc.ErrorInfo` of a failed call: `reason` (UPPER_SNAKE_CASE, listed in the
    contract), `domain` ("allot") and `metadata` (the values the reason speaks of)."""
    found = status(error)
    for detail in found.details if found else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    """The fields a refused INVALID_ARGUMENT call names (`google.rpc.BadRequest`)."""
    found = status(error)
    fields: list[str] = []
    for detail in found.details if found else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(violation.field for violation in bad.field_violations)
    return fields
