"""Use cases of auto-replenish (docs/design/auto-replenish.md): set and read a setting, take
quota's crossings of its rule, and re-arm the rule when a month's limit has passed.

A setting is kept in two places: billing's row (``auto_replenish``) and a usage alert rule in
the region's quota service (remaining <= ``below_quantity``, for the setting's API; owned by
auto-replenish, so it is no customer's alert: ``RULE_OWNER``) whose
``threshold_crossed`` events billing follows on the stream it already reads for pay-per-use
(``services/billing/pay_per_use.py``). SetAutoReplenish creates the rule switched off when the
setting has none, writes billing's row (with the rule's id), then tells quota the threshold and
switch (``sync``): quota evaluates the rule at once, and a crossing it announces finds billing's
row already there. A sync quota did not take is due work (``rearm_due``): the row keeps
``rearm_time`` until quota took it. The same due work re-arms the rule at the start of the
month after the month's limit was reached.

Every quota command carries a request id derived from what it does, so a retried sync never
re-arms twice (a second re-arm at or below the threshold would be a second crossing).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from services.billing.adapters import replenish_repository as repo
from services.billing.adapters.quota_client import QuotaRefused, QuotaUnavailable
from services.billing.app import accounts, orders
from services.billing.app.context import BillingContext
from services.billing.app.subscriptions import quota_request_id
from services.billing.domain.replenish import (
    LIMIT_REACHED,
    OFFER_GONE,
    AutoReplenish,
    Crossing,
    Outcome,
    check_below_quantity,
    check_lifts,
    check_max_per_month,
    decide,
    next_month_start,
)
from shared.auth import check_scope, current_principal
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id
from shared.validation import check_account_id
from shared.validity import month_key

log = logging.getLogger("allot.billing.replenish")

T = TypeVar("T")
# Settings re-armed per pass of the clock (the scheduler runs passes until none is left).
DUE_BATCH = 100


@dataclass(frozen=True)
class ReplenishInput:
    account_id: str
    region: str
    api: str
    offer_id: str
    below_quantity: int
    max_per_month: int
    enabled: bool


@dataclass(frozen=True)
class ReplenishView:
    setting: AutoReplenish
    month_purchases: int


# Runs billing's record in a transaction (with the request's idempotency key, when it has one).
Keep = Callable[[Callable[[UnitOfWork], Awaitable[ReplenishView]]], Awaitable[T]]


def not_found(account_id: str, region: str, api: str) -> NotFound:
    return NotFound(
        "AUTO_REPLENISH_NOT_FOUND",
        f"no auto-replenish setting for {account_id!r} in {region!r} for {api!r}",
        account_id=account_id,
        region=region,
        api=api,
    )


def check_input(ctx: BillingContext, spec: ReplenishInput) -> None:
    """Every field of SetAutoReplenish, named when it is wrong."""
    check_account_id(spec.account_id)
    ctx.check_region(spec.region)
    ctx.check_api(spec.api)
    if not spec.offer_id:
        raise InvalidArgument("offer_id", "offer_id is required")
    offer = ctx.catalog.offers.get(spec.offer_id)
    if offer is None:
        raise InvalidArgument(
            "offer_id",
            f"unknown offer {spec.offer_id!r}",
            reason="UNKNOWN_OFFER",
            offer_id=spec.offer_id,
        )
    if offer.api != spec.api:
        raise InvalidArgument(
            "offer_id",
            f"offer {offer.id!r} is an offer of {offer.api!r}, not of {spec.api!r}",
            reason="OFFER_NOT_FOR_API",
            offer_id=offer.id,
        )
    if spec.region not in offer.regions:
        raise InvalidArgument(
            "offer_id",
            f"offer {offer.id!r} is not sold in {spec.region!r}",
            reason="OFFER_NOT_IN_REGION",
            offer_id=offer.id,
        )
    check_below_quantity(spec.below_quantity)
    check_max_per_month(spec.max_per_month)
    check_lifts(offer.quantity, spec.below_quantity)


async def set_auto_replenish(
    ctx: BillingContext, request_id: str, spec: ReplenishInput, keep: Keep[T]
) -> T:
    """SetAutoReplenish: a rule in quota (created switched off) when the setting has none yet,
    billing's row, then the rule's threshold and switch (``sync``)."""
    check_input(ctx, spec)
    await ctx.db.read(lambda uow: accounts.load_account(uow, spec.account_id))
    scope = (spec.account_id, spec.region, spec.api)
    old = await ctx.db.read(lambda uow: repo.get(uow, *scope))
    if old is not None and old.alert_id:
        alert_id = old.alert_id  # quota is told the new values by the sync below
    else:
        alert_id = await ctx.quota.create_usage_alert(
            quota_request_id("replenish-rule", request_id, *scope),
            spec.account_id,
            spec.region,
            spec.api,
            spec.below_quantity,
            False,
        )
    reply = await keep(lambda uow: _record(ctx, uow, spec, alert_id))
    stored = await ctx.db.read(lambda uow: repo.get(uow, *scope))
    for _ in range(2):  # a second time after replacing a rule deleted in quota
        if stored is None or not await sync(ctx, stored):
            break  # on failure the due work tries again
        stored = await ctx.db.read(lambda uow: repo.get(uow, *scope))
    return reply


async def _record(
    ctx: BillingContext, uow: UnitOfWork, spec: ReplenishInput, alert_id: str
) -> ReplenishView:
    now = ctx.now()
    old = await repo.get(uow, spec.account_id, spec.region, spec.api, for_update=True)
    setting = AutoReplenish(
        account_id=spec.account_id,
        region=spec.region,
        api=spec.api,
        offer_id=spec.offer_id,
        below_quantity=spec.below_quantity,
        max_per_month=spec.max_per_month,
        enabled=spec.enabled,
        alert_id=alert_id,
        last_failure_reason="",
        # Quota is told the threshold and the switch (and re-arms the rule) once this row is
        # committed: a crossing it announces then finds the row.
        rearm_time=now,
        rearm_request_id=new_id("replenish-rearm"),
        create_time=old.create_time if old is not None else now,
        update_time=now,
    )
    await repo.put(uow, setting)
    count = await repo.month_purchases(uow, *_scope(setting), month_key(now, ctx.tz))
    return ReplenishView(setting, count)


def _scope(setting: AutoReplenish) -> tuple[str, str, str]:
    return setting.account_id, setting.region, setting.api


async def get_auto_replenish(
    ctx: BillingContext, account_id: str, region: str, api: str
) -> ReplenishView:
    """GetAutoReplenish: the setting and this month's purchases."""
    account_id = check_account_id(current_principal().scoped_account(account_id))
    ctx.check_region(region)
    ctx.check_api(api)
    check_scope(account_id, region)

    async def work(uow: UnitOfWork) -> ReplenishView:
        setting = await repo.get(uow, account_id, region, api)
        if setting is None:
            raise not_found(account_id, region, api)
        month = month_key(ctx.now(), ctx.tz)
        count = await repo.month_purchases(uow, account_id, region, api, month)
        return ReplenishView(setting, count)

    return await ctx.db.read(work)


# --- the rule in quota -----------------------------------------------------------------------


async def sync(ctx: BillingContext, setting: AutoReplenish) -> bool:
    """Tell quota the rule's threshold and switch (re-arming it: quota evaluates it at once)
    when the row asks for it; True once the row changed: quota took it (the row no longer
    asks), or the rule was gone in quota and a new one, switched off, took its place (the row
    asks again, with a new request id)."""
    if setting.rearm_time is None:
        return False
    try:
        await ctx.quota.update_usage_alert(
            # One id per re-arm: a retry is answered from quota's idempotency, never re-arms
            # a second time.
            setting.rearm_request_id,
            setting.region,
            setting.alert_id,
            setting.api,
            setting.below_quantity,
            setting.enabled,
        )
    except QuotaUnavailable as exc:
        log.info("auto-replenish rule %s not re-armed yet: %s", setting.alert_id, exc)
        return False
    except QuotaRefused as refused:
        if refused.reason != "USAGE_ALERT_NOT_FOUND":
            log.error("auto-replenish rule %s refused: %s", setting.alert_id, refused)
            return await _settled(ctx, setting, refused.reason)
        return await _replace_rule(ctx, setting)
    return await _settled(ctx, setting, None)


async def _settled(ctx: BillingContext, setting: AutoReplenish, failure: str | None) -> bool:
    async def work(uow: UnitOfWork) -> bool:
        current = await repo.get(uow, *_scope(setting), for_update=True)
        if current is None or current.rearm_request_id != setting.rearm_request_id:
            return False  # changed meanwhile: its own sync follows
        reason = failure if failure is not None else current.last_failure_reason
        done = dataclasses.replace(
            current, rearm_time=None, rearm_request_id="", last_failure_reason=reason
        )
        await repo.put(uow, done)
        return True

    return await ctx.db.transaction(work)


async def _replace_rule(ctx: BillingContext, setting: AutoReplenish) -> bool:
    """The setting's rule was deleted in quota (by an admin; or by the customer, when it is a
    rule made before rules had owners, docs/design/auto-replenish.md): create another, owned
    and switched off, and ask for a sync of it."""
    log.warning("auto-replenish rule %s is gone in quota: a new one", setting.alert_id)
    try:
        alert_id = await ctx.quota.create_usage_alert(
            f"{setting.rearm_request_id}-rule",
            setting.account_id,
            setting.region,
            setting.api,
            setting.below_quantity,
            False,
        )
    except (QuotaUnavailable, QuotaRefused) as exc:
        log.info("auto-replenish rule of %s not replaced yet: %s", _scope(setting), exc)
        return False

    async def work(uow: UnitOfWork) -> bool:
        current = await repo.get(uow, *_scope(setting), for_update=True)
        if current is None or current.rearm_request_id != setting.rearm_request_id:
            return False
        again = dataclasses.replace(
            current, alert_id=alert_id, rearm_request_id=new_id("replenish-rearm")
        )
        await repo.put(uow, again)
        return True

    return await ctx.db.transaction(work)


async def rearm_due(ctx: BillingContext, now: datetime) -> int:
    """Sync every rule whose re-arm is due at ``now``; how many quota took."""
    due = await ctx.db.read(lambda uow: repo.due_rearms(uow, now, DUE_BATCH))
    return sum([await sync(ctx, setting) for setting in due])


# --- crossings -------------------------------------------------------------------------------


async def take_crossing(ctx: BillingContext, uow: UnitOfWork, crossing: Crossing) -> str | None:
    """Act on quota's crossing of a rule, in the transaction that moves the stream's cursor:
    place the purchase (its order id is returned, for quota to be asked after the commit),
    or announce why not. A crossing is acted on once: its event id is kept with the order."""
    setting = await repo.get(
        uow, crossing.account_id, crossing.region, crossing.api, for_update=True
    )
    if setting is None or setting.alert_id != crossing.alert_id:
        return None  # a customer's own rule, or one this setting no longer uses
    if await repo.crossing_seen(uow, crossing.event_id):
        return None
    now = ctx.now()
    # The month of the crossing (quota's instant), not of whichever replica takes it when.
    crossed = crossing.time or now
    month = month_key(crossed, ctx.tz)
    count = await repo.month_purchases(uow, *_scope(setting), month)
    outcome = decide(setting, crossing, count)
    if outcome == Outcome.IGNORE:
        return None
    if outcome == Outcome.LIMIT_REACHED:
        rearm = next_month_start(crossed, ctx.tz)
        await _failed(ctx, uow, setting, crossing, month, count, LIMIT_REACHED, rearm)
        return None
    if setting.offer_id not in ctx.catalog.offers:
        await _failed(ctx, uow, setting, crossing, month, count, OFFER_GONE, None)
        return None
    spec = orders.PurchaseInput(
        account_id=setting.account_id,
        offer_id=setting.offer_id,
        region=setting.region,
        enterprise_project_id="",
        effective_time=None,
        auto_renew=False,
        kind=orders.OrderKind.AUTO_REPLENISH,
    )
    try:
        order = await orders.purchase(ctx, uow, spec)
    except (FailedPrecondition, InvalidArgument, NotFound) as refused:  # before any write
        await _failed(ctx, uow, setting, crossing, month, count, refused.reason, None)
        return None
    await repo.record_crossing(uow, crossing.event_id, setting, month, order.order_id, "", now)
    if setting.last_failure_reason:
        await repo.put(uow, dataclasses.replace(setting, last_failure_reason=""))
    log.info("auto-replenish of %s: order %s", _scope(setting), order.order_id)
    return order.order_id


async def _failed(
    ctx: BillingContext,
    uow: UnitOfWork,
    setting: AutoReplenish,
    crossing: Crossing,
    month: str,
    count: int,
    reason: str,
    rearm: datetime | None,
) -> None:
    now = ctx.now()
    await repo.record_crossing(uow, crossing.event_id, setting, month, "", reason, now)
    failed = dataclasses.replace(setting, last_failure_reason=reason)
    # A re-arm at `rearm` unless an earlier sync is pending already (it comes first; a crossing
    # it brings over the limit schedules this one again).
    if rearm is not None and (setting.rearm_time is None or setting.rearm_time > rearm):
        failed = dataclasses.replace(
            failed, rearm_time=rearm, rearm_request_id=new_id("replenish-rearm")
        )
    await repo.put(uow, failed)
    ctx.events.auto_replenish_failed(uow, setting, crossing, reason, count, now)
    log.info("auto-replenish of %s bought nothing (%s)", _scope(setting), reason)
