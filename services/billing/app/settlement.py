"""Pay-per-use settlement: each hourly cycle, once it has ended, is priced, charged and
booked (docs/design/billing.md); the intake that fills the cycles is ``app/usage.py``.

Settlement
==========

Due work (``settle_due``) takes every unsettled cycle that has ended, oldest cycle first, one
small transaction per cycle, and for it:

1. prices the calls not billed yet with ``domain.pricing.price_usage``: the catalog's tiers of
   the region and the API's free monthly allowance, after ``used_before`` = the account's
   pay-per-use calls of that region and API already rated in the same calendar month of the
   billing time zone (free ones included, all enterprise projects). Calls are numbered in the
   order they are rated; since cycles are settled in cycle order that is the sum of the
   month's earlier cycles (and, for late usage, every call rated before it, so no tier number
   is ever given twice);
2. rounds the price half up to the currency's minor unit, once per line
   (``domain.bills.pay_per_use_line``);
3. takes it from the paying account's balance (an enterprise member's master) and books a
   ledger line (``PAY_PER_USE``, on the member's/account's bill, paid by the payer, the cycle,
   the quantity, the tier breakdown as JSON, ``occur_time`` = the settlement instant);
4. marks the cycle settled (``entry_id`` = the line);
5. arrears: a charge that leaves the balance below zero starts ``GRACE`` now
   (``domain.arrears.after_charge``), announced for the payer and its members;
6. balance alert: when the charge takes the balance below the payer's threshold and the alert
   has not fired since the balance was last above it, ``balance_below_threshold`` is emitted.

A cycle of an API missing from billing's catalog cannot be priced: it is logged and left
unsettled (it is settled once the catalog has the API again).
"""

from __future__ import annotations

import logging
from datetime import datetime

from services.billing.adapters import accounts_repository
from services.billing.adapters import ledger_repository as ledger
from services.billing.adapters import usage_repository as repo
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.app.standing import change_standing
from services.billing.domain.accounts import Account
from services.billing.domain.arrears import after_charge
from services.billing.domain.bills import pay_per_use_line
from services.billing.domain.cycles import month_bounds, month_key
from services.billing.domain.usage import CycleKey, Unpriceable
from shared.db import UnitOfWork
from shared.money import MoneyError
from shared.pricing import price_usage
from shared.projects import DEFAULT_PROJECT
from shared.timeutil import from_epoch_us, to_epoch_us

__all__ = ["CycleKey", "Unpriceable", "settle_cycle", "settle_due"]

log = logging.getLogger("allot.billing.usage")

# Cycles read per query, and the most cycles one run settles (the scheduler runs the work
# again while it reports progress, so a backlog is worked off in bounded steps).
PAGE = 200
MAX_PER_RUN = 2_000


async def settle_due(ctx: BillingContext, now: datetime) -> int:
    """Settle every unsettled cycle that has ended by ``now``, in cycle order; returns how many
    lines were booked (at most MAX_PER_RUN per call)."""
    now_us = to_epoch_us(now)
    done = 0
    after: CycleKey | None = None
    while done < MAX_PER_RUN:
        due = await ctx.db.read(lambda uow, after=after: repo.due_cycles(uow, now_us, after, PAGE))
        for key in due:
            try:
                done += await ctx.db.transaction(
                    lambda uow, key=key: settle_cycle(ctx, uow, key, now)
                )
            except Unpriceable as exc:
                log.error("cannot settle %s: %s; left unsettled", key, exc)
        if len(due) < PAGE:
            break
        after = due[-1]
    return done


async def settle_cycle(ctx: BillingContext, uow: UnitOfWork, key: CycleKey, now: datetime) -> int:
    """Settle one cycle's calls not billed yet; 1 if a line was booked, else 0."""
    cycle = await repo.locked_cycle(uow, key)
    if cycle is None or cycle.settled or cycle.cycle_end_us > to_epoch_us(now):
        return 0
    billed = await ledger.billed_quantity(uow, key) if cycle.entry_id else 0
    quantity = cycle.quantity - billed
    if quantity <= 0:  # nothing new (cannot happen while quantities only grow)
        await repo.mark_settled(uow, key)
        return 0

    account = await accounts.load_account(uow, key.account_id)
    payer_id = account.payer_id
    payer = await accounts_repository.get(uow, payer_id, for_update=True)
    if payer is None:  # a member whose master vanished: accounts are never deleted
        raise Unpriceable(f"the paying account {payer_id!r} does not exist")

    api = ctx.catalog.apis.get(key.api)
    if api is None:
        raise Unpriceable(f"API {key.api!r} is not in the catalog")
    start = from_epoch_us(key.cycle_start_us)
    month_start, month_end = month_bounds(month_key(start, ctx.tz), ctx.tz)
    # The account's pay-per-use calls of the region and API already rated in the month of the
    # cycle (billing time zone), every enterprise project, free calls included.
    used_before = await ledger.rated_in_month(
        uow, key.account_id, key.region, key.api, month_start, month_end
    )
    try:
        priced = price_usage(
            api.tiers_for(key.region), api.free_monthly_quantity, used_before, quantity
        )
    except (MoneyError, ValueError) as exc:
        raise Unpriceable(f"the catalog's prices of {key.api!r}: {exc}") from exc
    try:
        line = pay_per_use_line(
            account_id=key.account_id,
            region=key.region,
            api=key.api,
            enterprise_project_id=key.enterprise_project_id,
            cycle=start,
            priced=priced,
            currency=payer.currency_code,
            settle_time=now,
            tz=ctx.tz,
            payer_account_id="" if payer_id == key.account_id else payer_id,
            description=_description(key, quantity, late=billed > 0),
        )
    except ValueError as exc:  # the stored cycle is not a cycle of the billing time zone
        raise Unpriceable(f"cycle {start.isoformat()}: {exc}") from exc
    # Take the line from the payer's balance and write its ledger line (signed by its effect,
    # like every ledger line).
    await accounts_repository.add_to_balance(uow, payer_id, line.amount_micros, ctx.now())
    entry_id = await ledger.book(uow, line)
    await repo.mark_settled(uow, key, entry_id)
    await _after_charge(ctx, uow, payer, line.amount_micros, now)
    # A capped account's quota learns the month's settled charges of every region
    # (docs/design/spending-cap.md).
    await accounts.announce_spending(ctx, uow, await accounts.load_account(uow, key.account_id))
    ctx.events.metrics.settled(uow, (to_epoch_us(now) - cycle.cycle_end_us) / 1_000_000)
    return 1


def _description(key: CycleKey, quantity: int, late: bool) -> str:
    calls = "call" if quantity == 1 else "calls"
    text = f"{quantity} pay-per-use {calls} of {key.api} in {key.region}"
    if key.enterprise_project_id not in ("", DEFAULT_PROJECT):
        text += f", project {key.enterprise_project_id}"
    return text + (" (reported late)" if late else "")


async def _after_charge(
    ctx: BillingContext, uow: UnitOfWork, payer: Account, amount_micros: int, now: datetime
):
    """Arrears and the balance alert after the payer's balance moved by ``amount_micros``
    (a charge: negative)."""
    balance = payer.balance_micros + amount_micros
    before = payer.arrears
    state = after_charge(before, balance, now, payer.grace_period, payer.retention_period)
    if state != before:
        await change_standing(ctx, uow, payer.account_id, before.standing, state)
    await accounts.balance_moved(ctx, uow, payer.account_id, payer.balance_micros, balance, now)
