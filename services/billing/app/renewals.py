"""Use cases of renewals: renew a package by hand, switch its auto-renewal, run due attempts.

A renewal is an order (RENEWAL by hand, AUTO_RENEWAL by the schedule) paid at once like a
purchase, for whole validity periods of the package's offer at the offer's current price. It
moves the package's expiry by the periods, counted from the expiry billing sold last
(``domain.renewal.renewed_expire_time``), and adds the offer's quantity per period; quota is
asked after the commit with the order id as request id (``fulfilment.fulfil``), and is told the
new expiry, so a retried renewal never renews twice.

Manual renewal is allowed until the package expires and for 15 days after
(``PACKAGE_NOT_RENEWABLE`` later, for a package billing did not sell, and for a cancelled
one); renewing after expiry forfeits the remainder the package had (quota does that).

Auto-renewal tries at 03:00 (billing time zone) ``lead_days`` before expiry, then daily at
03:00 while it fails (balance short, account in arrears), until the package expires; each
failure is an ``auto_renew_failed`` event naming the reason and the next attempt. Attempts
are due work of the clock: one that came due while billing was down is made at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import TypeVar

from services.billing.adapters import orders_repository, packages_repository
from services.billing.adapters.quota_client import QuotaRefused
from services.billing.app import fulfilment, orders, packages
from services.billing.app.context import BillingContext
from services.billing.app.packages import SoldPackage, UnknownPackage, not_renewable
from services.billing.domain.renewal import (
    DEFAULT_LEAD_DAYS,
    MAX_LEAD_DAYS,
    forfeits_remainder,
    next_attempt,
    renewal_allowed,
    renewed_expire_time,
    scheduled_attempt,
)
from shared.auth import check_scope, current_principal
from shared.db import UnitOfWork
from shared.errors import AllotError, FailedPrecondition, InvalidArgument
from shared.money import to_micros
from shared.validity import ONE_SECOND

log = logging.getLogger("allot.billing.renewals")

T = TypeVar("T")

# The most periods one renewal may buy.
MAX_PERIODS = 10
# Due attempts taken per pass of the clock (the scheduler runs passes until none is left).
DUE_BATCH = 100


def check_periods(periods: int) -> int:
    """``periods`` of RenewPackage: 0 means 1."""
    if periods == 0:
        return 1
    if not 1 <= periods <= MAX_PERIODS:
        raise InvalidArgument("periods", f"periods must be between 1 and {MAX_PERIODS}")
    return periods


def check_lead_days(lead_days: int) -> int:
    """``lead_days`` of SetAutoRenew: 0 means the default (7)."""
    if lead_days == 0:
        return DEFAULT_LEAD_DAYS
    if not 1 <= lead_days <= MAX_LEAD_DAYS:
        raise InvalidArgument("lead_days", f"lead_days must be between 1 and {MAX_LEAD_DAYS}")
    return lead_days


async def explained(ctx: BillingContext, account_id: str | None, call: Awaitable[T]) -> T:
    """Await a call about a package; a package billing has no record of is explained as
    ``PACKAGE_NOT_FOUND`` (no such package, or another account's) or ``PACKAGE_NOT_RENEWABLE``
    (cancelled, or granted in quota without billing). ``account_id`` is whose the package must
    be; None means any account the caller may act for."""
    try:
        return await call
    except UnknownPackage as unknown:
        raise await _unknown(ctx, account_id, unknown.package_id) from None


async def _unknown(ctx: BillingContext, account_id: str | None, package_id: str) -> AllotError:
    if not package_id:
        return InvalidArgument("package_id", "package_id is required")
    owner = await ctx.db.read(lambda uow: orders_repository.package_owner(uow, package_id))
    why = "its purchase was cancelled"
    if owner is None:
        owner = await _owner_in_quota(ctx, package_id)
        why = "it was not bought through billing"
    if owner is None or not _owned(owner, account_id):
        return packages.package_not_found(package_id)
    return not_renewable(package_id, why)


def _owned(owner: str, account_id: str | None) -> bool:
    if account_id is not None:
        return owner == account_id
    return current_principal().may_act_for(owner)


async def _owner_in_quota(ctx: BillingContext, package_id: str) -> str | None:
    """Whose the package is in any region's quota service (None when none has it)."""
    asked: set[str] = set()
    for region, addr in ctx.quota.endpoints.items():
        if addr in asked:
            continue
        asked.add(addr)
        try:
            package = await ctx.quota.get_package(region, package_id)
        except QuotaRefused as refused:
            if refused.reason == "PACKAGE_NOT_FOUND":
                continue
            raise
        return package.account_id
    return None


async def _place(
    ctx: BillingContext, uow: UnitOfWork, sold: SoldPackage, periods: int, kind: orders.OrderKind
) -> orders.Order:
    """Pay for ``periods`` more periods of a package and record the PENDING renewal; raises
    FailedPrecondition before writing anything when it cannot be paid."""
    offer = ctx.catalog.offers.get(sold.offer_id)
    if offer is None:
        raise not_renewable(sold.package_id, f"its offer {sold.offer_id!r} is no longer sold")
    price = to_micros(offer.price) * periods
    account, payer = await orders.paying_accounts(ctx, uow, sold.account_id, price)
    purchase = await orders.load_order(ctx, uow, sold.order_id)
    now = ctx.now()
    expire = renewed_expire_time(sold.expire_time, offer.validity_months, periods, ctx.tz)
    new = orders.NewOrder(
        kind=kind,
        account_id=account.account_id,
        paying_account_id=payer.account_id,
        offer_id=offer.id,
        region=sold.region,
        api=offer.api,
        enterprise_project_id=purchase.enterprise_project_id,
        quantity=offer.quantity * periods,
        periods=periods,
        price_micros=price,
        effective_time=sold.expire_time + ONE_SECOND,
        expire_time=expire,
        package_id=sold.package_id,
    )
    description = f"{offer.id} in {sold.region}: {sold.package_id} renewed for {periods} period(s)"
    if forfeits_remainder(sold.expire_time, now):
        description += " after expiry (the remainder at expiry is forfeited)"
    order = await orders.place(ctx, uow, new, description)
    await packages.save(
        ctx,
        uow,
        sold.package_id,
        expire_time=expire,
        next_attempt_time=scheduled_attempt(expire, sold.lead_days, now, ctx.tz)
        if sold.auto_renew
        else None,
        last_failure_reason="",
    )
    return order


async def renew(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, package_id: str, periods: int
) -> orders.Order:
    """RenewPackage: place the renewal (quota is asked after the commit)."""
    if not package_id:
        raise InvalidArgument("package_id", "package_id is required")
    sold = await packages.load(uow, package_id, for_update=True)
    if sold.account_id != account_id:
        raise packages.package_not_found(package_id)
    check_scope(sold.account_id, sold.region)
    if not renewal_allowed(sold.expire_time, ctx.now()):
        raise not_renewable(package_id, "it expired more than 15 days ago")
    return await _place(ctx, uow, sold, periods, orders.OrderKind.RENEWAL)


async def set_auto_renew(
    ctx: BillingContext, uow: UnitOfWork, package_id: str, enabled: bool, lead_days: int
) -> SoldPackage:
    """SetAutoRenew: switch the schedule on or off; it starts from the package's expiry."""
    if not package_id:
        raise InvalidArgument("package_id", "package_id is required")
    sold = await packages.load(uow, package_id, for_update=True)
    check_scope(sold.account_id, sold.region)
    now = ctx.now()
    if enabled and now >= sold.expire_time + ONE_SECOND:
        raise not_renewable(package_id, "it has expired: renew it with RenewPackage")
    return await packages.save(
        ctx,
        uow,
        package_id,
        auto_renew=enabled,
        lead_days=lead_days,
        next_attempt_time=scheduled_attempt(sold.expire_time, lead_days, now, ctx.tz)
        if enabled
        else None,
    )


async def check_package_scope(uow: UnitOfWork, package_id: str) -> None:
    """The caller may see this sold package (its account and region)."""
    sold = await packages.load(uow, package_id)
    check_scope(sold.account_id, sold.region)


async def get_auto_renew(ctx: BillingContext, package_id: str) -> SoldPackage:
    """GetAutoRenew: the setting and schedule of a package billing sold."""
    if not package_id:
        raise InvalidArgument("package_id", "package_id is required")
    try:
        sold = await ctx.db.read(lambda uow: packages.load(uow, package_id))
    except UnknownPackage:
        raise packages.package_not_found(package_id) from None
    check_scope(sold.account_id, sold.region)
    return sold


async def renew_due(ctx: BillingContext, now: datetime) -> int:
    """Make every auto-renewal attempt due at ``now``; returns how many were made."""
    due = await ctx.db.read(lambda uow: packages_repository.due_attempts(uow, now, DUE_BATCH))
    made = 0
    for package_id in due:
        attempted, order = await ctx.db.transaction(
            lambda uow, package_id=package_id: _attempt(ctx, uow, package_id, now)
        )
        made += attempted
        if order is not None:
            await fulfilment.fulfil(ctx, order.order_id)
    return made


async def _attempt(
    ctx: BillingContext, uow: UnitOfWork, package_id: str, now: datetime
) -> tuple[bool, orders.Order | None]:
    """One attempt, in one transaction with its order or its failure event."""
    try:
        sold = await packages.load(uow, package_id, for_update=True)
    except UnknownPackage:  # cancelled since it was read
        return False, None
    due = sold.next_attempt_time
    if not sold.auto_renew or due is None or due > now:
        return False, None  # another replica made it, or the setting changed
    if now >= sold.expire_time + ONE_SECOND:
        await _failed(ctx, uow, sold, now, "PACKAGE_EXPIRED")
        return True, None
    try:
        order = await _place(ctx, uow, sold, 1, orders.OrderKind.AUTO_RENEWAL)
    except FailedPrecondition as refused:  # raised before anything was written
        await _failed(ctx, uow, sold, now, refused.reason)
        return True, None
    await packages.save(ctx, uow, package_id, last_attempt_time=now)
    log.info("auto-renewed %s: order %s", package_id, order.order_id)
    return True, order


async def _failed(
    ctx: BillingContext, uow: UnitOfWork, sold: SoldPackage, now: datetime, reason: str
) -> None:
    sold = await packages.save(
        ctx,
        uow,
        sold.package_id,
        last_attempt_time=now,
        last_failure_reason=reason,
        next_attempt_time=next_attempt(now, sold.expire_time, ctx.tz),
    )
    ctx.events.auto_renew_failed(uow, sold, reason, ctx.now())
    log.info("auto-renewal of %s failed (%s)", sold.package_id, reason)
