"""Logging: the request id of the call being served (a contextvar set per call), text or JSON
lines (ALLOT_LOG_FORMAT), the access line of every call, and the client interceptors that pass
the request id on to the services a call reaches (docs/faults.md, "Logs").

Levels: ALLOT_LOG_LEVEL is the level of the suite's own loggers (`allot.*`). The root logger,
and with it every library, stays at WARNING whatever that level is, so DEBUG shows the suite's
debug lines and never the drivers' hundreds.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

import grpc

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("allot_request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"

# The parent of every logger of the suite; ALLOT_LOG_LEVEL applies to it alone.
SUITE_LOGGER = "allot"
# One line per call at INFO (shared/interceptors.py).
access_log = logging.getLogger("allot.access")

# Libraries that log the data they carry at DEBUG or INFO: SQL with its parameters (webhook
# secrets), HTTP requests with their URLs, SMTP exchanges (credentials). The root logger stays
# at WARNING, so they do too; naming them here holds them there even when something (a test
# harness) lowers the root's level, so the log never holds a secret (docs/security.md).
QUIET_LIBRARIES = (
    "aiosqlite",
    "asyncpg",
    "sqlalchemy",
    "httpx",
    "httpcore",
    "hpack",
    "aiosmtplib",
    "grpc",
    "asyncio",
)
# Libraries whose INFO lines an operator wants: alembic names each migration it runs. They go
# no lower than INFO (alembic's DEBUG is its SQL).
INFO_LIBRARIES = ("alembic",)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, service, logger, request_id,
    message, and the fields an access line carries (`extra={"fields": {...}}`)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(service: str, level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Log lines of `service` to stderr (or `stream`): `text` (one readable line) or `json`."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s"
            )
        )
    # Every call writes an access line: the record skips what no line of ours shows (the
    # caller's frame, thread and process), as the logging HOWTO's "Optimization" suggests.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(SUITE_LOGGER).setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in INFO_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level.upper())))


# --- the request id on outbound calls -----------------------------------------------------


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    current = request_id.get()
    if current == "-":  # not serving a call (background work): the callee makes one up
        return details
    metadata = list(details.metadata or ())
    if any(key == REQUEST_ID_HEADER for key, _ in metadata):
        return details  # the caller chose one
    metadata.append((REQUEST_ID_HEADER, current))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _UnaryRequestId(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


class _StreamRequestId(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


def client_interceptors() -> tuple[grpc.aio.ClientInterceptor, ...]:
    """For the channels to the other services (shared/tls.py): every call made while serving
    one carries that call's request id, so one id follows a purchase from billing into quota."""
    return (_UnaryRequestId(), _StreamRequestId())
