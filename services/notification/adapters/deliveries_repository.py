"""Deliveries in the database: claims, outcomes and wake-ups, in the unit of work's transaction.

A claim is held until a wall-clock instant (`wall_us`, epoch microseconds): crash recovery is
about real time, whatever the service clock does. Due times are on the service clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import or_, select, update

from services.notification.adapters import tables as t
from services.notification.domain.delivery import FAILED, PENDING, SENT
from services.notification.domain.messages import Channel
from services.notification.domain.notifications import DeliveryKey
from shared.db import UnitOfWork
from shared.timeutil import to_epoch_us


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


def _key(key: DeliveryKey) -> tuple:
    d = t.deliveries.c
    return (d.notification_id == key[0], d.contact_id == key[1])


async def _mark_claimed(uow: UnitOfWork, keys: Iterable[DeliveryKey], until_us: int) -> None:
    for key in keys:
        await uow.session.execute(
            update(t.deliveries).where(*_key(key)).values(claim_until_us=until_us)
        )


async def claim_due(
    uow: UnitOfWork, now: datetime, wall_us: int, until_us: int, limit: int
) -> list[DeliveryKey]:
    """Claim up to `limit` pending deliveries due at `now` that nobody sends, earliest first
    (rows another transaction locked are skipped, not waited for)."""
    d = t.deliveries.c
    rows = await uow.rows(
        select(d.notification_id, d.contact_id)
        .where(d.state == PENDING, d.due_time_us <= to_epoch_us(now), _unclaimed(wall_us))
        .order_by(d.due_time_us)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    keys = [(r.notification_id, r.contact_id) for r in rows]
    await _mark_claimed(uow, keys, until_us)
    return keys


async def claim_probes(
    uow: UnitOfWork, now: datetime, wall_us: int, until_us: int, webhook_limit: int
) -> list[DeliveryKey]:
    """Claim the earliest held-back delivery of each channel (each webhook contact, up to
    `webhook_limit` of them): pending, tried before, its retry not yet due, not being sent."""
    d = t.deliveries.c
    held = _held_back(now, wall_us)
    webhooks = (
        await uow.session.execute(
            select(d.contact_id)
            .where(*held, d.channel == int(Channel.WEBHOOK))
            .distinct()
            .order_by(d.contact_id)
            .limit(webhook_limit)
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
    await _mark_claimed(uow, keys, until_us)
    return keys


def _pending(key: DeliveryKey) -> tuple:
    return (*_key(key), t.deliveries.c.state == PENDING)


async def pending_attempts(uow: UnitOfWork, key: DeliveryKey) -> int | None:
    """How often a pending delivery was tried; None when it is not pending (or gone)."""
    rows = await uow.rows(select(t.deliveries.c.attempts).where(*_pending(key)))
    return rows[0].attempts if rows else None


async def mark_sent(uow: UnitOfWork, key: DeliveryKey, attempts: int, now: datetime) -> None:
    await uow.session.execute(
        update(t.deliveries)
        .where(*_pending(key))
        .values(
            state=SENT,
            attempts=attempts,
            last_error="",
            deliver_time_us=to_epoch_us(now),
            claim_until_us=None,
        )
    )


async def release_probe(uow: UnitOfWork, key: DeliveryKey, error: str) -> None:
    """A failed probe: not counted, the delivery keeps its attempts and its next retry."""
    await uow.session.execute(
        update(t.deliveries).where(*_pending(key)).values(last_error=error, claim_until_us=None)
    )


async def mark_failed_attempt(
    uow: UnitOfWork, key: DeliveryKey, attempts: int, error: str, retry_at: datetime | None
) -> None:
    """A failed attempt: due again at `retry_at`, or FAILED when there is none."""
    values: dict = {"attempts": attempts, "last_error": error, "claim_until_us": None}
    if retry_at is None:
        values["state"] = FAILED
    else:
        values["due_time_us"] = to_epoch_us(retry_at)
    await uow.session.execute(update(t.deliveries).where(*_pending(key)).values(**values))


async def wake_behind(uow: UnitOfWork, key: DeliveryKey, now: datetime, wall_us: int) -> None:
    """The channel of `key` works again: make the deliveries that wait for a retry behind
    the same outage due now (emails and SMS: all of their channel, which one relay or gateway
    carries; webhooks: those to the same contact). Claimed ones are left to their sender."""
    d = t.deliveries.c
    channel = (await uow.session.execute(select(d.channel).where(*_key(key)))).scalar_one()
    behind = [*_held_back(now, wall_us), d.channel == channel]
    if channel == int(Channel.WEBHOOK):
        behind.append(d.contact_id == key[1])
    await uow.session.execute(
        update(t.deliveries).where(*behind).values(due_time_us=to_epoch_us(now))
    )


async def reset(uow: UnitOfWork, key: DeliveryKey, now: datetime) -> bool:
    """Make a delivery pending and due `now` with a fresh set of attempts; whether it exists."""
    result = await uow.session.execute(
        update(t.deliveries)
        .where(*_key(key))
        .values(state=PENDING, attempts=0, due_time_us=to_epoch_us(now))
    )
    return result.rowcount > 0
