"""Opaque keyset page tokens (AIP-158): the last key of a page plus a digest of the query.

A token is only valid for the query that produced it; anything else is INVALID_ARGUMENT on
`page_token`. No offsets and no COUNT(*).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from shared.errors import InvalidArgument

T = TypeVar("T")

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


async def paged(
    request: Message,
    fetch: Callable[[list | None, int], Awaitable[list[T]]],
    key_of: Callable[[T], list],
) -> tuple[list[T], str]:
    """One page of a List RPC and the token of the next: what every List RPC does.

    `fetch(after, limit)` reads at most `limit` items (one more than the page holds) that come
    after the key `after` (the key list of the previous page's last item, None on the first
    page); `key_of` gives an item's key as the list the token carries.
    """
    after = decode_page_token(request)
    limit = page_size(request.page_size)
    found = await fetch(after, limit + 1)
    return page_of(found, limit, key_of, request)


def paged_list(
    request: Message, items: Sequence[T], key_of: Callable[[T], list]
) -> tuple[list[T], str]:
    """`paged` for an in-memory list already sorted by `key_of`."""
    after = decode_page_token(request)
    limit = page_size(request.page_size)
    found = [item for item in items if after is None or key_of(item) > after]
    return page_of(found[: limit + 1], limit, key_of, request)
