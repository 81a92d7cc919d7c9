"""Notifications as they are stored and read: one per source event, with one delivery per
contact it went to; and the rules of test notifications."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.notification.domain.messages import MessageType
from shared.errors import InvalidArgument, NotFound, ResourceExhausted

# Test notifications per contact and window (SendTestNotification).
TEST_LIMIT = 3
TEST_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class DeliveryView:
    contact_id: str
    channel: int
    state: int
    attempts: int
    last_error: str
    due_time: datetime
    deliver_time: datetime | None


@dataclass(frozen=True)
class NotificationView:
    notification_id: str
    account_id: str
    message_type: MessageType
    source_event_id: str
    subject: str
    body: str
    data: dict
    create_time: datetime
    deliveries: tuple[DeliveryView, ...]
    # Made while no contact was subscribed to its type: nobody was told.
    unheard: bool = False


# A delivery is known by its notification and its contact.
DeliveryKey = tuple[str, str]


def notification_not_found(notification_id: str) -> NotFound:
    return NotFound(
        "NOTIFICATION_NOT_FOUND",
        f"no notification {notification_id!r}",
        notification_id=notification_id,
    )


def delivery_not_found(notification_id: str, contact_id: str) -> NotFound:
    return NotFound(
        "DELIVERY_NOT_FOUND",
        f"notification {notification_id!r} has no delivery to contact {contact_id!r}",
        notification_id=notification_id,
        contact_id=contact_id,
    )


def check_delivery_key(notification_id: str, contact_id: str) -> None:
    if not notification_id:
        raise InvalidArgument("notification_id", "notification_id is required")
    if not contact_id:
        raise InvalidArgument("contact_id", "contact_id is required")


def check_test_rate(contact_id: str, sent: list[datetime]) -> None:
    """At most TEST_LIMIT test notifications per contact per TEST_WINDOW (docs/security.md: an
    unverified address is not a free mailer). `sent`: the contact's test notifications of the
    window, oldest first."""
    if len(sent) >= TEST_LIMIT:
        retry_time = sent[-TEST_LIMIT] + TEST_WINDOW
        raise ResourceExhausted(
            "TEST_NOTIFICATION_RATE_LIMITED",
            f"at most {TEST_LIMIT} test notifications per contact per hour; "
            f"retry after {retry_time.isoformat()}",
            contact_id=contact_id,
            limit=TEST_LIMIT,
            retry_time=retry_time.isoformat(),
        )
