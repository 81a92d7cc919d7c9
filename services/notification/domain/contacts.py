"""Contacts: where an account's notifications go, and the rules their fields follow."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.notification.domain.messages import Channel, MessageType
from shared.errors import InvalidArgument, NotFound

# Every message type but TEST, which goes to one contact on request (SendTestNotification).
SUBSCRIBABLE = frozenset(MessageType) - {MessageType.TEST}
# The fields UpdateContact may change.
UPDATABLE = frozenset({"address", "message_types"})


@dataclass(frozen=True)
class Contact:
    contact_id: str
    account_id: str
    channel: Channel
    address: str
    message_types: tuple[MessageType, ...]
    webhook_secret: str
    create_time: datetime
    update_time: datetime

    def wants(self, message_type: MessageType) -> bool:
        """Whether this contact subscribed to messages of `message_type`."""
        return message_type in self.message_types


def contact_not_found(contact_id: str) -> NotFound:
    return NotFound("CONTACT_NOT_FOUND", f"no contact {contact_id!r}", contact_id=contact_id)


def check_contact_id(contact_id: str) -> str:
    if not contact_id:
        raise InvalidArgument("contact_id", "contact_id is required")
    return contact_id


def check_channel(value: int) -> Channel:
    try:
        return Channel(value)
    except ValueError:
        raise InvalidArgument("contact.channel", "channel must be EMAIL, SMS or WEBHOOK") from None


def check_message_types(values: tuple[int, ...]) -> tuple[MessageType, ...]:
    """The subscribed types, each once, in order; TEST and unknown numbers are refused."""
    if not values:
        raise InvalidArgument("contact.message_types", "at least one message type is required")
    out = []
    for value in values:
        try:
            kind = MessageType(value)
        except ValueError:
            kind = None
        if kind not in SUBSCRIBABLE:
            raise InvalidArgument(
                "contact.message_types", f"unknown message type {value}", message_type=value
            )
        if kind not in out:
            out.append(kind)
    return tuple(sorted(out))


def check_audience_types(values: tuple[int, ...]) -> tuple[MessageType, ...]:
    """The types CheckAudience is asked about: every subscribable one when none is named;
    TEST (never subscribed to) and unknown numbers are refused."""
    if not values:
        return tuple(sorted(SUBSCRIBABLE))
    out = set()
    for value in values:
        try:
            kind = MessageType(value)
        except ValueError:
            kind = None
        if kind not in SUBSCRIBABLE:
            raise InvalidArgument(
                "message_types", f"unknown message type {value}", message_type=value
            )
        out.add(kind)
    return tuple(sorted(out))


def audience(
    contacts: list[Contact], message_types: tuple[MessageType, ...]
) -> list[tuple[MessageType, int]]:
    """How many of `contacts` are subscribed to each type (0: nobody hears it)."""
    return [(kind, sum(1 for c in contacts if c.wants(kind))) for kind in message_types]


def check_update_paths(paths: list[str]) -> list[str]:
    """The fields an update changes: those named, or every updatable one when none is."""
    unknown = sorted(set(paths) - UPDATABLE)
    if unknown:
        raise InvalidArgument(
            "update_mask", f"cannot update {unknown}; updatable: {sorted(UPDATABLE)}"
        )
    return list(paths) or sorted(UPDATABLE)
