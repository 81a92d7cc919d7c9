"""Use cases of notifications: intake (one per source event), test notifications, reads.

Intake runs in the stream consumer's transaction: a replayed source event finds its
notification and adds nothing (the source event id is unique), so every crossing yields
exactly one notification and one delivery per matching contact. Sending them is
`app/deliveries.py`'s work.
"""

from __future__ import annotations

import logging

from services.notification.adapters import contacts_repository as contacts_repo
from services.notification.adapters import notifications_repository as repo
from services.notification.app.contacts import load_contact
from services.notification.app.context import NotificationContext
from services.notification.domain.contacts import Contact
from services.notification.domain.messages import Message, MessageType, sample_message
from services.notification.domain.notifications import (
    TEST_WINDOW,
    NotificationView,
    check_test_rate,
    notification_not_found,
)
from shared.db import UnitOfWork
from shared.ids import new_id
from shared.validation import check_enum

log = logging.getLogger("allot.notification")

# --- intake ------------------------------------------------------------------------------


async def take(
    ctx: NotificationContext,
    uow: UnitOfWork,
    message: Message,
    source_event_id: str | None,
    contacts: list[Contact] | None = None,
) -> str | None:
    """Create the notification of `message` and one delivery per matching contact, once per
    source event. Returns the notification id, or None when the event was taken before."""
    if source_event_id is not None and await repo.taken_before(uow, source_event_id):
        return None
    now = ctx.now()
    notification_id = new_id("ntf")
    if contacts is None:
        every = await contacts_repo.list_contacts(uow, message.account_id, None)
        contacts = [c for c in every if c.wants(message.message_type)]
    if not contacts:
        # Kept and marked unheard, so the account can see what it missed
        # (docs/design/notification.md, "Unheard notifications").
        log.info(
            "%s notification %s of %s reaches no contact: recorded as unheard",
            message.message_type.name,
            notification_id,
            message.account_id,
        )
    await repo.insert_notification(uow, notification_id, message, source_event_id, now, contacts)
    view = await load_view(uow, notification_id)
    ctx.events.notification_created(uow, view, message.region, now)
    return notification_id


async def send_test(ctx: NotificationContext, uow: UnitOfWork, contact: Contact) -> str:
    """A test notification to `contact` alone, within the test rate (`check_test_rate`).
    Counted in the database, under the contact's row lock, so the limit holds across
    replicas and restarts."""
    await load_contact(uow, contact.contact_id, for_update=True)
    now = ctx.now()
    sent = await repo.sent_test_times(
        uow, contact.account_id, contact.contact_id, now - TEST_WINDOW
    )
    check_test_rate(contact.contact_id, sent)
    message = sample_message(contact.account_id, contact.contact_id)
    notification_id = await take(ctx, uow, message, None, contacts=[contact])
    assert notification_id is not None
    return notification_id


# --- reads --------------------------------------------------------------------------------


async def load_view(uow: UnitOfWork, notification_id: str) -> NotificationView:
    views = await repo.load_views(uow, [notification_id])
    if not views:
        raise notification_not_found(notification_id)
    return views[0]


async def list_notifications(
    ctx: NotificationContext,
    account_id: str,
    message_types: list[int],
    before_id: str | None,
    limit: int,
    regions: frozenset[str] | None = None,
) -> list[NotificationView]:
    """Newest first (ids sort by creation); an unknown message type is INVALID_ARGUMENT.
    With `regions` (a region-limited token), only notifications about those regions and
    account-wide ones, filtered in the query so pages stay full (docs/security.md)."""
    for value in message_types:
        check_enum(value, MessageType, "message_types")

    async def work(uow: UnitOfWork) -> list[NotificationView]:
        ids = await repo.list_ids(uow, account_id, message_types, before_id, limit, regions)
        return await repo.load_views(uow, ids)

    return await ctx.db.read(work)
