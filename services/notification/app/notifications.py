"""Use cases of notifications: intake (one per source event), delivery with retries, reads.

Intake runs in the stream consumer's transaction: a replayed source event finds its
notification and adds nothing (the source event id is unique), so every crossing yields
exactly one notification and one delivery per matching contact. Delivery happens outside any
transaction: a delivery is claimed for `ctx.claim` of wall-clock time while it is sent, then
recorded as SENT or rescheduled with backoff (FAILED after the last attempt). A process that
dies mid-send leaves the delivery to be sent again once the claim ends (at least once: receivers
de-duplicate on `Allot-Notification-Id`, mail readers on its stable Message-ID).

A successful send wakes the deliveries waiting for a retry behind the same outage: every
pending email or SMS (one relay or gateway carries them all) and every pending delivery to the
same webhook contact is due at once, so a channel that comes back drains its queue in the
same round instead of at each delivery's next backoff step (docs/faults.md, "Deliveries").
While deliveries are held back, the earliest of each channel is probed on a wall-clock period
(`probe_held_back`), so a channel that comes back is found without waiting for a backoff step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from allot.notification.v1 import notification_pb2
from sqlalchemy import insert, or_, select, update

from services.notification.adapters import tables as t
from services.notification.adapters.channels import DeliveryError, OutgoingMessage
from services.notification.adapters.events import to_proto_notification
from services.notification.app.contacts import Contact, load_contact, to_contact
from services.notification.app.context import NotificationContext
from services.notification.domain.delivery import FAILED, PENDING, SENT
from services.notification.domain.messages import Channel, Message, MessageType, sample_message
from shared.db import UnitOfWork
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.ids import new_id
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validation import check_enum

log = logging.getLogger("allot.notification")

# Deliveries claimed per round.
ROUND = 20
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
    n = t.notifications.c
    if source_event_id is not None:
        seen = (
            await uow.session.execute(
                select(n.notification_id).where(n.source_event_id == source_event_id)
            )
        ).first()
        if seen is not None:
            return None
    now = ctx.now()
    notification_id = new_id("ntf")
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
        )
    )
    if contacts is None:
        rows = (
            await uow.session.execute(
                select(t.contacts).where(t.contacts.c.account_id == message.account_id)
            )
        ).all()
        contacts = [c for c in map(to_contact, rows) if message.message_type in c.message_types]
    if contacts:
        await uow.session.execute(
            insert(t.deliveries),
            [
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
            ],
        )
    view = await load_view(uow, notification_id)
    ctx.outbox.add(
        uow,
        "notification_created",
        notification_pb2.NotificationCreated(notification=to_proto_notification(view)),
        now,
        account_id=message.account_id,
        # Regional messages (usage alerts, packages, orders) carry their region; account-level
        # ones (arrears, balance) have none and are visible to every region.
        region=message.region,
    )
    return notification_id


async def send_test(ctx: NotificationContext, uow: UnitOfWork, contact: Contact) -> str:
    """A test notification to `contact` alone, at most TEST_LIMIT per contact per TEST_WINDOW
    (docs/security.md: an unverified address is not a free mailer). Counted in the database,
    under the contact's row lock, so the limit holds across replicas and restarts."""
    await load_contact(uow, contact.contact_id, for_update=True)
    now = ctx.now()
    n, d = t.notifications.c, t.deliveries.c
    sent = (
        await uow.session.execute(
            select(n.create_time_us)
            .join(t.deliveries, d.notification_id == n.notification_id)
            .where(
                n.account_id == contact.account_id,
                n.message_type == int(MessageType.TEST),
                n.create_time_us > to_epoch_us(now - TEST_WINDOW),
                d.contact_id == contact.contact_id,
            )
            .order_by(n.create_time_us)
        )
    ).all()
    if len(sent) >= TEST_LIMIT:
        retry_time = from_epoch_us(sent[-TEST_LIMIT].create_time_us) + TEST_WINDOW
        raise ResourceExhausted(
            "TEST_NOTIFICATION_RATE_LIMITED",
            f"at most {TEST_LIMIT} test notifications per contact per hour; "
            f"retry after {retry_time.isoformat()}",
            contact_id=contact.contact_id,
            limit=TEST_LIMIT,
            retry_time=retry_time.isoformat(),
        )
    message = sample_message(contact.account_id, contact.contact_id)
    notification_id = await take(ctx, uow, message, None, contacts=[contact])
    assert notification_id is not None
    return notification_id


# --- delivery -----------------------------------------------------------------------------


async def deliver_due(ctx: NotificationContext, now: datetime) -> int:
    """Attempt every delivery due at `now`, a round at a time; returns how many were tried."""
    tried = 0
    for _ in range(1000):  # bounded: each round claims what is due, and claims push it ahead
        # A success in the last round made the deliveries behind it due "now": include them.
        due = max(now, ctx.now())
        claimed = await ctx.db.transaction(lambda uow, due=due: _claim(uow, due, ctx.claim))
        if not claimed:
            break
        await asyncio.gather(*(_attempt(ctx, key, due) for key in claimed))
        tried += len(claimed)
    return tried


def _wall_us() -> int:
    """Now on the wall clock, for claims: crash recovery is about real time."""
    return time.time_ns() // 1000


def _unclaimed(wall_us: int):
    d = t.deliveries.c
    return or_(d.claim_until_us.is_(None), d.claim_until_us <= wall_us)


def _held_back(now: datetime, wall_us: int) -> tuple:
    """Deliveries waiting for a retry after a failure: pending, tried before, not yet due, and
    not being sent. What a probe picks from and a success wakes (docs/faults.md, "Deliveries")."""
    d = t.deliveries.c
    return (
        d.state == PENDING,
        d.attempts > 0,
        d.due_time_us > to_epoch_us(now),
        _unclaimed(wall_us),
    )


async def _claim(uow: UnitOfWork, now: datetime, claim: timedelta) -> list[tuple[str, str]]:
    d = t.deliveries.c
    wall = _wall_us()
    rows = (
        await uow.session.execute(
            select(d.notification_id, d.contact_id)
            .where(d.state == PENDING, d.due_time_us <= to_epoch_us(now), _unclaimed(wall))
            .order_by(d.due_time_us)
            .limit(ROUND)
            .with_for_update(skip_locked=True)
        )
    ).all()
    keys = [(r.notification_id, r.contact_id) for r in rows]
    await _mark_claimed(uow, keys, wall, claim)
    return keys


async def _mark_claimed(
    uow: UnitOfWork, keys: list[tuple[str, str]], wall_us: int, claim: timedelta
) -> None:
    d = t.deliveries.c
    claim_until = wall_us + int(claim.total_seconds() * 1_000_000)
    for notification_id, contact_id in keys:
        await uow.session.execute(
            update(t.deliveries)
            .where(d.notification_id == notification_id, d.contact_id == contact_id)
            .values(claim_until_us=claim_until)
        )


async def probe_held_back(ctx: NotificationContext) -> int:
    """Try the earliest delivery held back by failures on each channel again now, whatever
    its backoff: one email (one SMTP relay carries them all), one SMS (one gateway), one
    webhook per contact. A probe that fails is not counted (the delivery keeps its attempts
    and its next retry); one that succeeds is that delivery's successful attempt and wakes the
    rest behind it (`_wake_behind`). Returns how many probes succeeded. The service runs it
    every ALLOT_DELIVERY_PROBE_SECONDS of wall time (docs/faults.md, "Deliveries")."""
    now = ctx.now()
    keys = await ctx.db.transaction(lambda uow: _claim_probes(uow, now, ctx.claim))
    sent = await asyncio.gather(*(_attempt(ctx, key, now, probe=True) for key in keys))
    return sum(sent)


async def _claim_probes(uow: UnitOfWork, now: datetime, claim: timedelta) -> list[tuple[str, str]]:
    """Claim the earliest held-back delivery of each channel (each webhook contact): pending,
    tried before, its retry not yet due, not being sent."""
    d = t.deliveries.c
    wall = _wall_us()
    held = _held_back(now, wall)
    webhooks = (
        await uow.session.execute(
            select(d.contact_id)
            .where(*held, d.channel == int(Channel.WEBHOOK))
            .distinct()
            .order_by(d.contact_id)
            .limit(ROUND)
        )
    ).scalars()
    groups = [
        (d.channel == int(Channel.EMAIL),),
        (d.channel == int(Channel.SMS),),
        *((d.channel == int(Channel.WEBHOOK), d.contact_id == c) for c in webhooks),
    ]
    keys = []
    for group in groups:
        row = (
            await uow.session.execute(
                select(d.notification_id, d.contact_id)
                .where(*held, *group)
                .order_by(d.due_time_us)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
        ).first()
        if row is not None:
            keys.append((row.notification_id, row.contact_id))
    await _mark_claimed(uow, keys, wall, claim)
    return keys


async def _attempt(
    ctx: NotificationContext, key: tuple[str, str], now: datetime, probe: bool = False
) -> bool:
    """Send one claimed delivery and record the outcome; whether it was sent."""
    notification_id, contact_id = key

    async def load(uow: UnitOfWork):
        view = await load_view(uow, notification_id)
        try:
            contact = await load_contact(uow, contact_id)
        except NotFound:
            contact = None
        return view, contact

    view, contact = await ctx.db.read(load)
    error: DeliveryError | None = None
    if contact is None:
        error = DeliveryError("the contact was deleted", retryable=False)
    else:
        outgoing = OutgoingMessage(
            notification_id=view.notification_id,
            account_id=view.account_id,
            channel=int(contact.channel),
            address=contact.address,
            subject=view.subject,
            body=view.body,
            # The API's name of the type (MESSAGE_TYPE_USAGE_ALERT), as clients know it.
            message_type=f"MESSAGE_TYPE_{view.message_type.name}",
            payload=view.data,
            create_time=view.create_time,
            secret=contact.webhook_secret,
        )
        try:
            await ctx.senders[int(contact.channel)].send(outgoing)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # a sender bug must not stop the other deliveries
            log.exception("delivery %s to %s failed unexpectedly", notification_id, contact_id)
            error = DeliveryError(f"unexpected error: {type(exc).__name__}", retryable=True)
    await ctx.db.transaction(lambda uow: _record(ctx, uow, key, error, probe))
    return error is None


async def _record(
    ctx: NotificationContext, uow: UnitOfWork, key: tuple[str, str], error, probe: bool = False
) -> None:
    d = t.deliveries.c
    where = (d.notification_id == key[0], d.contact_id == key[1], d.state == PENDING)
    row = (await uow.session.execute(select(d.attempts).where(*where))).first()
    if row is None:  # dropped meanwhile (contact deleted)
        return
    now = ctx.now()
    attempts = row.attempts + 1
    if error is None:
        values = {
            "state": SENT,
            "attempts": attempts,
            "last_error": "",
            "deliver_time_us": to_epoch_us(now),
            "claim_until_us": None,
        }
        await _wake_behind(uow, key, now)
    elif probe:
        # Not counted: the delivery keeps its attempts and its next retry.
        values = {"last_error": str(error)[:1000], "claim_until_us": None}
        log.info("probe of delivery %s to %s failed: %s", key[0], key[1], error)
    else:
        retry_at = (
            ctx.retry.next_attempt(attempts, now, retry_after=error.retry_after)
            if error.retryable
            else None
        )
        values = {"attempts": attempts, "last_error": str(error)[:1000], "claim_until_us": None}
        if retry_at is None:
            values["state"] = FAILED
        else:
            values["due_time_us"] = to_epoch_us(retry_at)
        log.info("delivery %s to %s failed (attempt %d): %s", key[0], key[1], attempts, error)
    await uow.session.execute(update(t.deliveries).where(*where).values(**values))


async def _wake_behind(uow: UnitOfWork, key: tuple[str, str], now: datetime) -> None:
    """The channel of `key` works again: make the deliveries that wait for a retry behind
    the same outage due now (emails and SMS: all of their channel, which one relay or gateway
    carries; webhooks: those to the same contact). Claimed ones are left to their sender."""
    d = t.deliveries.c
    channel = (
        await uow.session.execute(
            select(d.channel).where(d.notification_id == key[0], d.contact_id == key[1])
        )
    ).scalar_one()
    behind = [*_held_back(now, _wall_us()), d.channel == channel]
    if channel == int(Channel.WEBHOOK):
        behind.append(d.contact_id == key[1])
    await uow.session.execute(
        update(t.deliveries).where(*behind).values(due_time_us=to_epoch_us(now))
    )


def check_delivery_key(notification_id: str, contact_id: str) -> None:
    if not notification_id:
        raise InvalidArgument("notification_id", "notification_id is required")
    if not contact_id:
        raise InvalidArgument("contact_id", "contact_id is required")


async def retry_delivery(
    ctx: NotificationContext, uow: UnitOfWork, notification_id: str, contact_id: str
) -> None:
    """Send a delivery again now, with a fresh set of attempts (typically a FAILED one)."""
    check_delivery_key(notification_id, contact_id)
    d = t.deliveries.c
    result = await uow.session.execute(
        update(t.deliveries)
        .where(d.notification_id == notification_id, d.contact_id == contact_id)
        .values(state=PENDING, attempts=0, due_time_us=to_epoch_us(ctx.now()))
    )
    if result.rowcount == 0:
        raise NotFound(
            "DELIVERY_NOT_FOUND",
            f"notification {notification_id!r} has no delivery to contact {contact_id!r}",
            notification_id=notification_id,
            contact_id=contact_id,
        )


# --- reads --------------------------------------------------------------------------------


async def load_view(uow: UnitOfWork, notification_id: str) -> NotificationView:
    views = await load_views(uow, [notification_id])
    if not views:
        raise NotFound(
            "NOTIFICATION_NOT_FOUND",
            f"no notification {notification_id!r}",
            notification_id=notification_id,
        )
    return views[0]


async def load_views(uow: UnitOfWork, ids: list[str]) -> list[NotificationView]:
    if not ids:
        return []
    n, d = t.notifications.c, t.deliveries.c
    rows = (
        await uow.session.execute(select(t.notifications).where(n.notification_id.in_(ids)))
    ).all()
    found = (
        await uow.session.execute(
            select(t.deliveries).where(d.notification_id.in_(ids)).order_by(d.contact_id)
        )
    ).all()
    by_notification: dict[str, list[DeliveryView]] = {}
    for r in found:
        by_notification.setdefault(r.notification_id, []).append(
            DeliveryView(
                contact_id=r.contact_id,
                channel=r.channel,
                state=r.state,
                attempts=r.attempts,
                last_error=r.last_error,
                due_time=from_epoch_us(r.due_time_us),
                deliver_time=from_epoch_us(r.deliver_time_us) if r.deliver_time_us else None,
            )
        )
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
        )
        for r in rows
    ]
    return sorted(views, key=lambda v: order[v.notification_id])


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

    async def work(uow: UnitOfWork) -> list[NotificationView]:
        ids = [r.notification_id for r in (await uow.session.execute(query)).all()]
        return await load_views(uow, ids)

    return await ctx.db.read(work)
