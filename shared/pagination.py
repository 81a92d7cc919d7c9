"""Opaque keyset page tokens (AIP-158): the last key of a page plus a digest of the query.

A token is only valid for the query that produced it; anything else is INVALID_ARGUMENT on
`page_token`. No offsets and no COUNT(*).
"""

from __future__ import annotations

import base64
import hashlib
import json

from google.protobuf.message import Message

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size", "page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def query_digest(request: Message) -> str:
    copy = type(request)()
    copy.CopyFrom(request)
    for name in ("page_token", "page_size"):
        copy.ClearField(name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode_page_token(last_key: list, request: Message) -> str:
    payload = json.dumps({"k": last_key, "q": query_digest(request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def page_of(items: list, limit: int, key_of, request: Message) -> tuple[list, str]:
    """Split a read of `limit + 1` items into the page and the token of the next page."""
    if len(items) <= limit:
        return items, ""
    return items[:limit], encode_page_token(key_of(items[limit - 1]), request)


def decode_page_token(request: Message) -> list | None:
    """The last key of the previous page, or None for the first page."""
    token = request.page_token
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        key, digest = payload["k"], payload["q"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("page_token", "page_token is malformed") from exc
    if digest != query_digest(request) or not isinstance(key, list):
        raise InvalidArgument("page_token", "page_token belongs to a different query")
    return key
