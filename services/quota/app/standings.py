"""Quota's projection of account standings, kept from billing's event stream.

Billing owns accounts and their arrears lifecycle (docs/design/arrears.md); each change of an
account's standing is one `account_standing_changed` event in billing's outbox. Quota consumes
billing's `WatchEvents` (see `service.py`; `adapters/billing_events.py` reads each event as a
domain `StandingChange`) and keeps one row per account in `account_standings`, which `CheckQuota`
reads for admission (absent = GOOD, pay-per-use not blocked): the standing, whether pay-per-use
is blocked in grace (billing's account setting) and the enterprise master of a member (which
lets the master's tokens read the member's packages and usage, docs/security.md).

`apply` runs inside the consumer's transaction, next to the cursor update, so the projection
and the cursor move together. It is idempotent and order-safe on its own, whatever the cursor
says: the row keeps the billing sequence (and id) of the change it holds and takes a change
only from an event with a greater sequence. So a replayed event, or an older change arriving
after a newer one (a cursor reset, a re-sync from 0), changes nothing. The order is billing's
sequence, not `change_time`: the sequence is billing's commit order, so the last change by
sequence is billing's current standing, while a change stamped with the instant it came due
may carry an earlier time than one committed before it.

An event quota cannot use (another payload, no account, an unknown standing) reads as no change
and is skipped rather than raised: raising would hold the stream at that event forever.
"""

from __future__ import annotations

import enum
import logging

from services.quota.adapters import subscriptions_repository as subscriptions_repo
from services.quota.app.context import QuotaContext
from services.quota.domain.admission import StandingChange
from shared.db import UnitOfWork

log = logging.getLogger("allot.quota.standings")

# The payload types of billing's stream that quota reads.
EVENT_TYPES = ("account_standing_changed",)


class Outcome(enum.Enum):
    APPLIED = "applied"  # the row now holds this change
    STALE = "stale"  # the row already holds this change or a newer one
    IGNORED = "ignored"  # not a usable standing change


async def apply(ctx: QuotaContext, uow: UnitOfWork, change: StandingChange | None) -> Outcome:
    """Take one standing change into `account_standings` (inside the caller's transaction);
    None (an event that announces no usable change) is ignored."""
    if change is None:
        return Outcome.IGNORED
    held = await subscriptions_repo.held_standing(uow, change.account_id)
    if held is not None:
        held_sequence, held_event_id = held
        if change.sequence <= held_sequence or (
            change.event_id and change.event_id == held_event_id
        ):
            return Outcome.STALE
    await subscriptions_repo.put_standing(uow, change, ctx.now(), new=held is None)
    log.info(
        "account %s: standing %s, pay-per-use blocked in grace %s, master %r"
        " (billing event %s, sequence %d)",
        change.account_id,
        change.standing.name,
        change.block_pay_per_use_in_grace,
        change.master_account_id,
        change.event_id,
        change.sequence,
    )
    return Outcome.APPLIED


async def members_of(ctx: QuotaContext, master_account_id: str) -> frozenset[str]:
    """The members of an enterprise master, as billing's events told quota: the accounts a
    master's tokens may read (docs/security.md, "Masters and members")."""
    return await ctx.db.read(lambda uow: subscriptions_repo.members_of(uow, master_account_id))
