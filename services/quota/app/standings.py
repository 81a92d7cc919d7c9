"""Quota's projection of account standings, kept from billing's event stream.

Billing owns accounts and their arrears lifecycle (docs/design.md); each change of an account's
standing is one `account_standing_changed` event in billing's outbox. Quota consumes billing's
`WatchEvents` (see `service.py`) and keeps one row per account in `account_standings`, which
`CheckQuota` reads for admission (absent = GOOD).

`apply` runs inside the consumer's transaction, next to the cursor update, so the projection
and the cursor move together. It is idempotent and order-safe on its own, whatever the cursor
says: the row keeps the billing sequence (and id) of the change it holds and takes a change
only from an event with a greater sequence. So a replayed event, or an older change arriving
after a newer one (a cursor reset, a re-sync from 0), changes nothing. The order is billing's
sequence, not `change_time`: the sequence is billing's commit order, so the last change by
sequence is billing's current standing, while a change stamped with the instant it came due
may carry an earlier time than one committed before it.

An event quota cannot use (another payload, no account, an unknown standing) is skipped with a
warning rather than raised: raising would hold the stream at that event forever.
"""

from __future__ import annotations

import enum
import logging

from allot.billing.v1 import billing_pb2
from sqlalchemy import insert, select, update

from services.quota.adapters import tables as t
from services.quota.app.context import QuotaContext
from services.quota.domain.admission import Standing
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.timeutil import from_timestamp, to_epoch_us
from shared.validation import check_account_id

log = logging.getLogger("allot.quota.standings")

# The payload types of billing's stream that quota reads.
EVENT_TYPES = ("account_standing_changed",)


class Outcome(enum.Enum):
    APPLIED = "applied"  # the row now holds this change
    STALE = "stale"  # the row already holds this change or a newer one
    IGNORED = "ignored"  # not a usable standing change


def _change_time_us(event: billing_pb2.BillingEvent) -> int:
    """When the standing changed: the payload's change_time, else the event's create_time."""
    payload = event.account_standing_changed
    for owner, field in ((payload, "change_time"), (event, "create_time")):
        if owner.HasField(field):
            try:
                return to_epoch_us(from_timestamp(getattr(owner, field), field))
            except InvalidArgument:
                continue
    return 0


async def apply(ctx: QuotaContext, uow: UnitOfWork, event: billing_pb2.BillingEvent) -> Outcome:
    """Take one billing event into `account_standings` (inside the caller's transaction)."""
    if event.WhichOneof("payload") != "account_standing_changed":
        return Outcome.IGNORED
    payload = event.account_standing_changed
    try:
        account_id = check_account_id(payload.account_id)
        standing = Standing(payload.standing)
    except (InvalidArgument, ValueError):
        log.warning(
            "billing event %s (sequence %d): unusable standing change %r of account %r; skipped",
            event.event_id,
            event.sequence,
            payload.standing,
            payload.account_id,
        )
        return Outcome.IGNORED

    c = t.account_standings.c
    held = (
        await uow.session.execute(
            select(c.billing_sequence, c.billing_event_id).where(c.account_id == account_id)
        )
    ).first()
    if held is not None and (
        event.sequence <= held.billing_sequence
        or (event.event_id and event.event_id == held.billing_event_id)
    ):
        return Outcome.STALE
    values = {
        "standing": int(standing),
        "update_time_us": to_epoch_us(ctx.now()),
        "change_time_us": _change_time_us(event),
        "billing_sequence": event.sequence,
        "billing_event_id": event.event_id,
    }
    if held is None:
        # Only the consumer holding the stream's lease writes here; should a second writer
        # ever insert first, the primary key fails and the whole transaction is retried.
        await uow.session.execute(
            insert(t.account_standings).values(account_id=account_id, **values)
        )
    else:
        await uow.session.execute(
            update(t.account_standings).where(c.account_id == account_id).values(**values)
        )
    log.info(
        "account %s: standing %s (billing event %s, sequence %d)",
        account_id,
        standing.name,
        event.event_id,
        event.sequence,
    )
    return Outcome.APPLIED
