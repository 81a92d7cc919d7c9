"""What every sender shares: the `Sender` shape, and how instants, ids and JSON look on the
wire (email headers, file names, webhook bodies, the SMS gateway's requests).

Every sender has the same shape: `await sender.send(message)` returns when the other side
accepted the message and raises `DeliveryError` otherwise, saying whether trying again later
can help (`retryable`). The delivery loop owns retries and backoff; a sender makes exactly
one attempt and never waits longer than its timeout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from services.notification.domain.delivery import OutgoingMessage

USER_AGENT = "allot-notification"


class Sender(Protocol):
    async def send(self, message: OutgoingMessage) -> None: ...

    async def close(self) -> None: ...


def utc(value: datetime) -> datetime:
    # Instants in this code base are aware UTC; a naive one is taken to be UTC, not local time.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def safe_id(notification_id: str) -> str:
    # Ids are ours (ULID-like), but they end up in file names and Message-IDs: keep them inert.
    return re.sub(r"[^A-Za-z0-9._-]", "_", notification_id) or "_"


def rfc3339(value: datetime) -> str:
    return utc(value).isoformat().replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_bytes(document: Mapping[str, object]) -> bytes:
    return json.dumps(
        document, ensure_ascii=False, separators=(",", ":"), default=_json_default
    ).encode()
