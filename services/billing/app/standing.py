"""Arrears by the clock: GRACE becomes FROZEN, FROZEN becomes RELEASED, and release cancels
the API subscriptions of the account and of its enterprise members.

Only paying accounts (standalone accounts and enterprise masters) carry a standing of their
own; a member follows its master (``accounts.load_account``) and is announced with it
(``accounts.announce_standing``). Each change is stamped with the instant it came due, not with
the instant the clock was seen to pass it (``domain.arrears.advance``): a clock moved a month
ahead yields ``FROZEN`` at the end of grace and ``RELEASED`` at the end of retention, each
announced in order.

Releasing subscriptions (docs/design/arrears.md)
================================================

At release, every ``ACTIVE`` row of billing's ``api_subscriptions`` of the account and its
members is marked ``RELEASING`` in the same transaction as the change of standing. That mark is
the durable "quota has not been told yet" marker: each run then calls the region's quota
``DisableApi`` for the marked rows and turns a row ``CANCELLED`` once quota has answered
(``NOT_FOUND`` counts as done: quota never had it). While a region's quota is unreachable its
rows stay marked and are retried on the next run, after a short pause per region so a dead
endpoint does not hold up every pass of the scheduler. A top-up after release does not undo it:
the marked rows are still cancelled at quota, and the customer subscribes again.

The request id of each ``DisableApi`` is ``release-{account}-{region}-{api}-{t}`` with ``t`` the
instant (microseconds) the row was marked, so retries of one release are one command at quota,
while a later release of a subscription that was taken again is a new command (an id without
the instant would be answered from quota's idempotency store and disable nothing).
``RELEASING`` reads as ``CANCELLED`` on the wire.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime

from services.billing.adapters import accounts_repository
from services.billing.adapters import subscriptions_repository as subscriptions_repo
from services.billing.adapters.quota_client import QuotaRefused, QuotaUnavailable
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.domain.accounts import AccountKind
from services.billing.domain.arrears import ArrearsState, Standing, advance
from services.billing.domain.subscriptions import SubscriptionState
from shared.db import UnitOfWork
from shared.errors import Kind

__all__ = ["SubscriptionState"]

log = logging.getLogger("allot.billing.standing")

# Accounts looked at per query, and the most state changes one run makes (the scheduler runs
# the work again while it reports progress).
PAGE = 200
MAX_PER_RUN = 5_000
# After quota of a region failed to answer, its pending releases wait this long (wall clock).
RELEASE_RETRY_SECONDS = 2.0
# Quota's request ids are at most this long.
MAX_REQUEST_ID = 200


async def change_standing(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    previous: Standing,
    state: ArrearsState,
) -> None:
    """Save a new standing of a paying account and announce it (for its members too)."""
    await accounts_repository.save_standing(uow, account_id, state, ctx.now())
    payer = await accounts.load_account(uow, account_id)
    await accounts.announce_standing(ctx, uow, payer, previous)
    if state.standing == Standing.RELEASED:
        await subscriptions_repo.mark_releasing(uow, account_id, state.since or ctx.now())


# --- the clock ------------------------------------------------------------------------------


async def catch_up(ctx: BillingContext, uow: UnitOfWork, account_id: str, now: datetime) -> int:
    """Apply (and announce) the changes of a paying account's standing that have come due by
    ``now`` and the clock has not applied yet: a top-up after grace ended first freezes the
    account, at its due time, then returns it to GOOD. Returns the number of changes."""
    account = await accounts_repository.get(uow, account_id, for_update=True)
    if account is None or account.kind == AccountKind.ENTERPRISE_MEMBER:
        return 0
    changes = advance(account.arrears, now)
    for change in changes:
        await change_standing(ctx, uow, account_id, change.previous, change.state)
    return len(changes)


async def advance_standings(
    ctx: BillingContext, now: datetime, releaser: SubscriptionReleaser | None = None
) -> int:
    """Apply every change of standing that has come due by ``now``, then tell quota about
    released subscriptions. Returns the number of changes and confirmed cancellations."""
    done = 0
    after = ""
    while done < MAX_PER_RUN:
        due = await ctx.db.read(
            lambda uow, after=after: accounts_repository.due_standings(uow, now, after, PAGE)
        )
        for account_id in due:
            done += await ctx.db.transaction(
                lambda uow, account_id=account_id: catch_up(ctx, uow, account_id, now)
            )
        if len(due) < PAGE:
            break
        after = due[-1]
    return done + await (releaser or SubscriptionReleaser()).run(ctx, now)


# --- telling quota --------------------------------------------------------------------------


def release_request_id(account_id: str, region: str, api: str, marked_us: int) -> str:
    """The request id of the DisableApi that releases one subscription (see the module doc)."""
    readable = f"release-{account_id}-{region}-{api}-{marked_us}"
    if len(readable) <= MAX_REQUEST_ID:
        return readable
    digest = hashlib.sha256(readable.encode()).hexdigest()
    return f"release-{digest}"


class SubscriptionReleaser:
    """Calls quota's DisableApi for subscriptions marked RELEASING, pausing per region after a
    failure. One per process (the pause is in memory; the marks are in the database)."""

    def __init__(
        self, retry_seconds: float = RELEASE_RETRY_SECONDS, wall_clock=time.monotonic
    ) -> None:
        self.retry_seconds = retry_seconds
        self._wall_clock = wall_clock
        self._paused_until: dict[str, float] = {}

    def _paused(self, region: str) -> bool:
        return self._paused_until.get(region, 0.0) > self._wall_clock()

    def _pause(self, region: str) -> None:
        self._paused_until[region] = self._wall_clock() + self.retry_seconds

    async def run(self, ctx: BillingContext, now: datetime) -> int:
        """Tell quota about pending releases; the number of rows now CANCELLED."""
        pending = await ctx.db.read(
            lambda uow: subscriptions_repo.pending_releases(uow, MAX_PER_RUN)
        )
        done = 0
        for row in pending:
            if self._paused(row.region):
                continue
            if row.region not in ctx.quota.endpoints:
                log.error(
                    "release of %s: no quota endpoint for region %s; %s stays pending",
                    row.account_id,
                    row.region,
                    row.api,
                )
                self._pause(row.region)
                continue
            request_id = release_request_id(row.account_id, row.region, row.api, row.marked_us)
            try:
                await ctx.quota.disable_api(request_id, row.account_id, row.region, row.api)
            except QuotaUnavailable as exc:
                log.warning("release of %s: %s; retrying later", row.account_id, exc.message)
                self._pause(row.region)
                continue
            except QuotaRefused as exc:
                if exc.kind != Kind.NOT_FOUND:
                    log.error(
                        "release of %s: quota refused DisableApi of %s in %s: %s %s",
                        row.account_id,
                        row.api,
                        row.region,
                        exc.reason,
                        exc.message,
                    )
                    self._pause(row.region)
                    continue
            done += await ctx.db.transaction(
                lambda uow, row=row: subscriptions_repo.confirm_release(uow, row, now)
            )
        return done


# --- wiring ---------------------------------------------------------------------------------

_WIRED = "_allot_standing_wiring"


def wire_standing(service) -> SubscriptionReleaser:
    """Register the arrears clock as due work of a ``BillingService`` (once per service).

    Register it after pay-per-use (``services/billing/pay_per_use.py``) so that, on one pass
    of the scheduler, a settlement that starts grace is seen by the clock in the same pass."""
    existing = getattr(service, _WIRED, None)
    if existing is not None:
        return existing
    releaser = SubscriptionReleaser()
    ctx = service.context

    async def work(now: datetime) -> int:
        return await advance_standings(ctx, now, releaser)

    service.runtime.scheduler.register("billing.standings", work)
    setattr(service, _WIRED, releaser)
    return releaser
