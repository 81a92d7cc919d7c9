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
import time
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
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return json_line(
            record.created,
            record.levelname,
            self.service,
            record.name,
            getattr(record, "request_id", "-"),
            record.getMessage(),
            getattr(record, "fields", None),
            exception,
        )


def json_line(
    created: float,
    level: str,
    service: str,
    logger: str,
    request_id: str,
    message: str,
    fields: dict | None = None,
    exception: str | None = None,
) -> str:
    """One JSON log line (`JsonFormatter`, and access lines written directly)."""
    line = {
        "time": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "service": service,
        "logger": logger,
        "request_id": request_id,
        "message": message,
    }
    if fields:
        line.update(fields)
    if exception:
        line["exception"] = exception
    return json.dumps(line, ensure_ascii=False, default=str)


class _AccessLines:
    """Writes access lines to the configured handler without a LogRecord (`access`): one line
    per call was about a tenth of a busy service's CPU through `logging` (the record, its
    filters, `strftime`), for a line that always has the same shape. The line is the one the
    handler's formatter would write; only while that handler is all the access logger reaches
    (no other handler or filter added, as a test's log capture adds one)."""

    def __init__(self, handler: logging.StreamHandler, service: str, fmt: str) -> None:
        self.handler = handler
        self.service = service
        self.json = fmt == "json"
        self._second = -1
        self._stamp = ""

    def reaches_only_ours(self) -> bool:
        handlers = logging.root.handlers
        suite = access_log.parent
        return (
            len(handlers) == 1
            and handlers[0] is self.handler
            and len(self.handler.filters) == 1
            and self.handler.level <= logging.INFO
            and not access_log.handlers
            and not access_log.filters
            and suite is not None
            and not suite.handlers
            and not suite.filters
            and access_log.propagate
            and suite.propagate
        )

    def line(self, message: str, fields: dict, created: float) -> str:
        rid = fields["request_id"]
        if self.json:
            return json_line(created, "INFO", self.service, access_log.name, rid, message, fields)
        second = int(created)
        if second != self._second:  # logging.Formatter's default time, formatted once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        msecs = int((created - second) * 1000)
        return f"{self._stamp},{msecs:03d} INFO {self.service} [{rid}] {access_log.name}: {message}"

    def write(self, text: str) -> None:
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(text + handler.terminator)
            handler.flush()
        finally:
            handler.release()


_access_lines: _AccessLines | None = None


def access(message: str, fields: dict) -> None:
    """Write one access line at INFO (shared/interceptors.py): `message` as the text line's
    message, `fields` (request_id among them) as the JSON line's fields."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    direct = _access_lines
    if direct is not None and direct.reaches_only_ours():
        try:
            direct.write(direct.line(message, fields, time.time()))
            return
        except Exception:  # noqa: BLE001 - the usual path reports a broken stream its way
            pass
    access_log.info("%s", message, extra={"fields": fields})


def configure(service: str, level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Log lines of `service` to stderr (or `stream`): `text` (one readable line) or `json`."""
    global _access_lines
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(_RequestIdFilter())
    _access_lines = _AccessLines(handler, service, fmt)
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
