"""Checks of identifiers, free text, quantities and enum numbers every service receives.

The bounds are documented in docs/security.md ("Hostile input"); a value outside them is
``INVALID_ARGUMENT`` naming the field, before anything is read or written.
"""

import functools
import re
from collections.abc import Iterable

from shared.errors import InvalidArgument

ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
# Counts of calls (package quantities, usage quantities, thresholds): far below 2^63, so that a
# sum of many of them still fits the int64 columns and google.protobuf's int64 fields.
MAX_QUANTITY = 10**12
# Ids chosen by callers (event_id, request_id, user_id, enterprise_project_id, ...).
MAX_ID_LENGTH = 128
# Free text (display names, reasons).
MAX_TEXT_LENGTH = 1024


def check_account_id(account_id: str, field: str = "account_id") -> str:
    if not account_id:
        raise InvalidArgument(field, f"{field} is required")
    # fullmatch: "$" would let a trailing newline through.
    if not ACCOUNT_ID.fullmatch(account_id):
        raise InvalidArgument(
            field, f"{field} must be 1-64 letters, digits or _.:@- starting with a letter or digit"
        )
    return account_id


# C0 control characters and DEL (a regular expression: checked on every id of every call).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_length(value: str, field: str, limit: int = MAX_ID_LENGTH) -> str:
    """``value`` if it has at most ``limit`` characters and no control characters."""
    if len(value) > limit:
        raise InvalidArgument(field, f"{field} is longer than {limit} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(field, f"{field} must not contain control characters")
    return value


def check_quantity(value: int, field: str, minimum: int = 0) -> int:
    """A count of calls in [minimum, MAX_QUANTITY]."""
    if not minimum <= value <= MAX_QUANTITY:
        raise InvalidArgument(field, f"{field} must be between {minimum} and {MAX_QUANTITY}")
    return value


def check_enum(value: int, known: Iterable[int], field: str) -> int:
    """An enum number the API defines (proto3 enums are open: any int32 arrives)."""
    if value not in set(known):
        raise InvalidArgument(field, f"{field} has no value {value}")
    return value


def check_strings(message, prefix: str = "") -> None:
    """Refuse a NUL character in any string field of a request (PostgreSQL's text cannot hold
    one, and no id or text of the API needs it), naming the field: ``contact.address``,
    ``message_types[2]``. Called for every request by the server interceptor.

    Repeated messages are not entered: a batch (``BatchReportUsage.requests``) checks each of
    its items in the item's own slot, so one bad item does not fail the others.
    """
    for name, kind in _string_fields(message.DESCRIPTOR):
        if kind is _ONE:
            if "\x00" in getattr(message, name):
                where = prefix + name
                raise InvalidArgument(where, f"{where} must not contain a NUL character")
        elif kind is _MANY:
            for index, text in enumerate(getattr(message, name)):
                if "\x00" in text:
                    where = f"{prefix}{name}[{index}]"
                    raise InvalidArgument(where, f"{where} must not contain a NUL character")
        elif message.HasField(name):
            check_strings(getattr(message, name), f"{prefix}{name}.")


_ONE, _MANY, _MESSAGE = "one", "many", "message"


@functools.cache
def _string_fields(descriptor) -> tuple[tuple[str, str], ...]:
    """A message type's string fields and singular message fields, read once per type (the
    descriptor's walk cost more than the check on every call)."""
    out = []
    for field in descriptor.fields:
        if field.type == field.TYPE_STRING:
            out.append((field.name, _MANY if field.is_repeated else _ONE))
        elif field.type == field.TYPE_MESSAGE and not field.is_repeated:
            out.append((field.name, _MESSAGE))
    return tuple(out)
