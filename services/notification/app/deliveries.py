"""Use cases of deliveries: sending what is due with retries, probing held-back channels, and
retrying a delivery on request.

Delivery happens outside any transaction: a delivery is claimed for `ctx.claim` of wall-clock
time while it is sent, then recorded as SENT or rescheduled with backoff (FAILED after the last
attempt). A process that dies mid-send leaves the delivery to be sent again once the claim ends
(at least once: receivers de-duplicate on `Allot-Notification-Id`, mail readers on its stable
Message-ID).

A successful send wakes the deliveries waiting for a retry behind the same outage: every
pending email or SMS (one relay or gateway carries them all) and every pending delivery to the
same webhook contact is due at once, so a channel that comes back drains its queue in the
same round instead of at each delivery's next backoff step (docs/faults.md, "Deliveries").
While deliveries are held back, the earliest of each channel is probed on a wall-clock period
(`probe_held_back`), so a channel that comes back is found without waiting for a backoff step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from services.notification.adapters import deliveries_repository as repo
from services.notification.app.contacts import load_contact
from services.notification.app.context import NotificationContext
from services.notification.app.notifications import load_view
from services.notification.domain.delivery import DeliveryError, OutgoingMessage
from services.notification.domain.notifications import (
    DeliveryKey,
    check_delivery_key,
    delivery_not_found,
)
from shared.db import UnitOfWork
from shared.errors import NotFound

log = logging.getLogger("allot.notification")

# Deliveries claimed per round.
ROUND = 20
# The longest `last_error` kept.
MAX_STORED_ERROR = 1000


def _wall_us() -> int:
    """Now on the wall clock, for claims: crash recovery is about real time."""
    return time.time_ns() // 1000


def _claim_until(wall_us: int, claim: timedelta) -> int:
    return wall_us + int(claim.total_seconds() * 1_000_000)


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


async def _claim(uow: UnitOfWork, now: datetime, claim: timedelta) -> list[DeliveryKey]:
    wall = _wall_us()
    return await repo.claim_due(uow, now, wall, _claim_until(wall, claim), ROUND)


async def probe_held_back(ctx: NotificationContext) -> int:
    """Try the earliest delivery held back by failures on each channel again now, whatever
    its backoff: one email (one SMTP relay carries them all), one SMS (one gateway), one
    webhook per contact. A probe that fails is not counted (the delivery keeps its attempts
    and its next retry); one that succeeds is that delivery's successful attempt and wakes the
    rest behind it (`repo.wake_behind`). Returns how many probes succeeded. The service runs it
    every ALLOT_DELIVERY_PROBE_SECONDS of wall time (docs/faults.md, "Deliveries")."""
    now = ctx.now()
    keys = await ctx.db.transaction(lambda uow: _claim_probes(uow, now, ctx.claim))
    sent = await asyncio.gather(*(_attempt(ctx, key, now, probe=True) for key in keys))
    return sum(sent)


async def _claim_probes(uow: UnitOfWork, now: datetime, claim: timedelta) -> list[DeliveryKey]:
    wall = _wall_us()
    return await repo.claim_probes(uow, now, wall, _claim_until(wall, claim), ROUND)


async def _attempt(
    ctx: NotificationContext, key: DeliveryKey, now: datetime, probe: bool = False
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
    outcome = await ctx.db.transaction(lambda uow: _record(ctx, uow, key, error, probe))
    if outcome is not None and contact is not None:  # committed: count it
        ctx.metrics.attempt(contact.channel.name, outcome)
    return error is None


async def _record(
    ctx: NotificationContext,
    uow: UnitOfWork,
    key: DeliveryKey,
    error: DeliveryError | None,
    probe: bool = False,
) -> str | None:
    """Record an attempt; its outcome for the metrics: SENT, RETRY, FAILED, or None (nothing
    counted: the delivery is gone, or a probe failed)."""
    tried = await repo.pending_attempts(uow, key)
    if tried is None:  # dropped meanwhile (contact deleted)
        return None
    now = ctx.now()
    attempts = tried + 1
    if error is None:
        await repo.wake_behind(uow, key, now, _wall_us())
        await repo.mark_sent(uow, key, attempts, now)
        return "SENT"
    if probe:
        # Not counted: the delivery keeps its attempts and its next retry.
        await repo.release_probe(uow, key, str(error)[:MAX_STORED_ERROR])
        log.info("probe of delivery %s to %s failed: %s", key[0], key[1], error)
        return None
    retry_at = (
        ctx.retry.next_attempt(attempts, now, retry_after=error.retry_after)
        if error.retryable
        else None
    )
    await repo.mark_failed_attempt(uow, key, attempts, str(error)[:MAX_STORED_ERROR], retry_at)
    log.info("delivery %s to %s failed (attempt %d): %s", key[0], key[1], attempts, error)
    return "FAILED" if retry_at is None else "RETRY"


async def retry_delivery(
    ctx: NotificationContext, uow: UnitOfWork, notification_id: str, contact_id: str
) -> None:
    """Send a delivery again now, with a fresh set of attempts (typically a FAILED one)."""
    check_delivery_key(notification_id, contact_id)
    if not await repo.reset(uow, (notification_id, contact_id), ctx.now()):
        raise delivery_not_found(notification_id, contact_id)
