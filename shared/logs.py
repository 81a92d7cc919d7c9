"""Logging with the request id of the call being served (a contextvar set per call)."""

from __future__ import annotations

import contextvars
import logging
import sys

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("allot_request_id", default="-")

# Libraries that log the data they carry at DEBUG or INFO: SQL with its parameters (webhook
# secrets), HTTP requests with their URLs, SMTP exchanges (credentials). ALLOT_LOG_LEVEL is
# ours; theirs says warnings only, so the log never holds a secret (docs/security.md).
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


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
