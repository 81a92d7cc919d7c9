"""Typed domain errors: a gRPC-independent kind, a contract reason and metadata.

Domain and application code raise these; `shared.status` is the one place that turns them into
`google.rpc.Status` with `ErrorInfo` / `BadRequest` details. Nothing here imports grpc.
"""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """The gRPC status code an error maps to, named without importing grpc."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"


class AllotError(Exception):
    """An expected failure with a reason in UPPER_SNAKE_CASE (docs/contract.md) and its values."""

    kind: Kind = Kind.FAILED_PRECONDITION

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        field: str | None = None,
        **metadata: object,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = {k: str(v) for k, v in metadata.items()}
        if field:
            self.metadata.setdefault("field", field)

    def within(self, prefix: str) -> AllotError:
        """Name the field as part of an enclosing message (`requests[3].` + `quantity`)."""
        if self.field:
            self.field = prefix + self.field
            self.metadata["field"] = self.field
        return self


class InvalidArgument(AllotError):
    kind = Kind.INVALID_ARGUMENT

    def __init__(self, field: str, message: str, reason: str = "INVALID_FIELD", **metadata: object):
        super().__init__(reason, message, field=field, **metadata)


class NotFound(AllotError):
    kind = Kind.NOT_FOUND


class AlreadyExists(AllotError):
    kind = Kind.ALREADY_EXISTS


class FailedPrecondition(AllotError):
    kind = Kind.FAILED_PRECONDITION


class PermissionDenied(AllotError):
    kind = Kind.PERMISSION_DENIED

    def __init__(self, message: str = "the caller may not do this", **metadata: object):
        super().__init__("PERMISSION_DENIED", message, **metadata)


class Unauthenticated(AllotError):
    kind = Kind.UNAUTHENTICATED

    def __init__(self, message: str, reason: str = "INVALID_TOKEN", **metadata: object):
        super().__init__(reason, message, **metadata)


class Aborted(AllotError):
    """A transaction lost a race it could not retry; the caller may retry the call."""

    kind = Kind.ABORTED


class ResourceExhausted(AllotError):
    """The caller holds too much of a bounded resource (streams, sends per hour); it may
    retry once it has released some or the window has passed."""

    kind = Kind.RESOURCE_EXHAUSTED


class Unavailable(AllotError):
    """The service cannot answer now (still starting, or a service it needs is away); the
    caller may retry the same call."""

    kind = Kind.UNAVAILABLE


def require(condition: bool, field: str, message: str) -> None:
    """Raise INVALID_ARGUMENT naming `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgument(field, message)
