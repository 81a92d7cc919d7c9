"""Billing's record of the packages it sold: one row per package (table ``auto_renewals``),
written when its purchase is fulfilled and moved by every renewal.

The row holds what renewing needs without asking quota: the owner, the offer, the region, the
purchase order, and the expiry as billing has sold it (the last renewal's, even while quota
has not applied it yet). It also holds the auto-renewal setting and schedule (enabled or not,
the lead, the next attempt, why the last one failed). Every change of a package's renewals
locks this row first, so renewals of one package are placed one after another, each counted
from the expiry the previous one sold.

A cancelled purchase deletes its row: a cancelled (revoked) package cannot be renewed.
"""

from __future__ import annotations

from datetime import datetime

from services.billing.adapters import packages_repository as repo
from services.billing.app.context import BillingContext
from services.billing.domain.orders import Order
from services.billing.domain.packages import (
    SoldPackage,
    UnknownPackage,
    not_renewable,
    package_not_found,
)
from services.billing.domain.renewal import DEFAULT_LEAD_DAYS, scheduled_attempt
from shared.db import UnitOfWork

__all__ = ["SoldPackage", "UnknownPackage", "not_renewable", "package_not_found"]


async def load(uow: UnitOfWork, package_id: str, for_update: bool = False) -> SoldPackage:
    """The record of a package billing sold; ``UnknownPackage`` when there is none."""
    sold = await repo.get(uow, package_id, for_update)
    if sold is None:
        raise UnknownPackage(package_id)
    return sold


async def record_purchase(
    ctx: BillingContext, uow: UnitOfWork, order: Order, package_id: str
) -> SoldPackage:
    """The record of a package a fulfilled purchase granted."""
    now = ctx.now()
    sold = SoldPackage(
        package_id=package_id,
        account_id=order.account_id,
        offer_id=order.offer_id,
        region=order.region,
        order_id=order.order_id,
        expire_time=order.expire_time,
        auto_renew=order.auto_renew,
        lead_days=DEFAULT_LEAD_DAYS,
        next_attempt_time=scheduled_attempt(order.expire_time, DEFAULT_LEAD_DAYS, now, ctx.tz)
        if order.auto_renew
        else None,
        last_attempt_time=None,
        last_failure_reason="",
    )
    await repo.insert_sold(uow, sold, now)
    return await load(uow, package_id)


async def save(ctx: BillingContext, uow: UnitOfWork, package_id: str, **values) -> SoldPackage:
    """Change a record: ``expire_time``, ``auto_renew``, ``lead_days``, ``next_attempt_time``,
    ``last_attempt_time``, ``last_failure_reason``."""
    await repo.update_sold(uow, package_id, ctx.now(), **values)
    return await load(uow, package_id)


async def reschedule(
    ctx: BillingContext, uow: UnitOfWork, sold: SoldPackage, expire_time: datetime
) -> SoldPackage:
    """The package is sold to ``expire_time`` now: its schedule starts again from there."""
    return await save(
        ctx,
        uow,
        sold.package_id,
        expire_time=expire_time,
        next_attempt_time=scheduled_attempt(expire_time, sold.lead_days, ctx.now(), ctx.tz)
        if sold.auto_renew
        else None,
    )


async def forget(uow: UnitOfWork, package_id: str) -> None:
    """A cancelled purchase: its package is revoked and can no longer be renewed."""
    await repo.delete_sold(uow, package_id)
