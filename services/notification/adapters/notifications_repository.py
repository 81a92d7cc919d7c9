"""Notifications in the database: rows <-> `NotificationView`, intake and reads, in the unit of
work's transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import insert, or_, select

from services.notification.adapters import tables as t
from services.notification.domain.contacts import Contact
from services.notification.domain.delivery import PENDING
from services.notification.domain.messages import Message, MessageType
from services.notification.domain.notifications import DeliveryView, NotificationView
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us


async def taken_before(uow: UnitOfWork, source_event_id: str) -> bool:
    """Whether the source event already has its notification (a replay)."""
    n = t.notifications.c
    seen = await uow.rows(select(n.notification_id).where(n.source_event_id == source_event_id))
    return bool(seen)


async def insert_notification(
    uow: UnitOfWork,
    notification_id: str,
    message: Message,
    source_event_id: str | None,
    now: datetime,
    contacts: Iterable[Contact],
) -> None:
    """The notification of `message` and one pending delivery, due `now`, per contact; with
    no contact it is recorded as unheard."""
    contacts = list(contacts)
    await uow.session.execute(
        insert(t.notifications).values(
            notification_id=notification_id,
            account_id=message.account_id,
            message_type=int(message.message_type),
            source_event_id=source_event_id,
            subject=message.subject,
            body=message.body,
            data=json.dumps(message.data, sort_keys=True),
            create_time_us=to_epoch_us(now),
            region=message.region,
            unheard=not contacts,
        )
    )
    deliveries = [
        {
            "notification_id": notification_id,
            "contact_id": c.contact_id,
            "channel": int(c.channel),
            "state": PENDING,
            "attempts": 0,
            "last_error": "",
            "due_time_us": to_epoch_us(now),
            "deliver_time_us": None,
        }
        for c in contacts
    ]
    if deliveries:
        await uow.session.execute(insert(t.deliveries), deliveries)


async def sent_test_times(
    uow: UnitOfWork, account_id: str, contact_id: str, since: datetime
) -> list[datetime]:
    """When the test notifications to a contact after `since` were made, oldest first."""
    n, d = t.notifications.c, t.deliveries.c
    rows = await uow.rows(
        select(n.create_time_us)
        .join(t.deliveries, d.notification_id == n.notification_id)
        .where(
            n.account_id == account_id,
            n.message_type == int(MessageType.TEST),
            n.create_time_us > to_epoch_us(since),
            d.contact_id == contact_id,
        )
        .order_by(n.create_time_us)
    )
    return [from_epoch_us(r.create_time_us) for r in rows]


def _to_delivery(row) -> DeliveryView:
    return DeliveryView(
        contact_id=row.contact_id,
        channel=row.channel,
        state=row.state,
        attempts=row.attempts,
        last_error=row.last_error,
        due_time=from_epoch_us(row.due_time_us),
        deliver_time=from_epoch_us(row.deliver_time_us) if row.deliver_time_us else None,
    )


async def load_views(uow: UnitOfWork, ids: list[str]) -> list[NotificationView]:
    """The notifications of `ids` that exist, in the order of `ids`, with their deliveries."""
    if not ids:
        return []
    n, d = t.notifications.c, t.deliveries.c
    rows = await uow.rows(select(t.notifications).where(n.notification_id.in_(ids)))
    found = await uow.rows(
        select(t.deliveries).where(d.notification_id.in_(ids)).order_by(d.contact_id)
    )
    by_notification: dict[str, list[DeliveryView]] = {}
    for r in found:
        by_notification.setdefault(r.notification_id, []).append(_to_delivery(r))
    order = {nid: i for i, nid in enumerate(ids)}
    views = [
        NotificationView(
            notification_id=r.notification_id,
            account_id=r.account_id,
            message_type=MessageType(r.message_type),
            source_event_id=r.source_event_id or "",
            subject=r.subject,
            body=r.body,
            data=json.loads(r.data),
            create_time=from_epoch_us(r.create_time_us),
            deliveries=tuple(by_notification.get(r.notification_id, ())),
            unheard=bool(r.unheard),
        )
        for r in rows
    ]
    return sorted(views, key=lambda v: order[v.notification_id])


async def list_ids(
    uow: UnitOfWork,
    account_id: str,
    message_types: list[int],
    before_id: str | None,
    limit: int,
    regions: frozenset[str] | None = None,
) -> list[str]:
    """The account's notification ids, newest first (ids sort by creation), before
    `before_id`; with `regions`, only those about these regions and account-wide ones."""
    n = t.notifications.c
    query = (
        select(n.notification_id)
        .where(n.account_id == account_id)
        .order_by(n.notification_id.desc())
        .limit(limit)
    )
    if regions is not None:
        query = query.where(or_(n.region == "", n.region.in_(sorted(regions))))
    if message_types:
        query = query.where(n.message_type.in_(sorted(set(message_types))))
    if before_id:
        query = query.where(n.notification_id < before_id)
    return [r.notification_id for r in await uow.rows(query)]
