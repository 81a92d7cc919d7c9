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

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from services.billing.adapters import tables as t
from services.billing.app.context import BillingContext
from services.billing.domain.renewal import DEFAULT_LEAD_DAYS, scheduled_attempt
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, NotFound
from shared.timeutil import from_epoch_us, to_epoch_us


@dataclass(frozen=True)
class SoldPackage:
    package_id: str
    account_id: str
    offer_id: str
    region: str
    order_id: str
    expire_time: datetime
    auto_renew: bool
    lead_days: int
    next_attempt_time: datetime | None
    last_attempt_time: datetime | None
    last_failure_reason: str


class UnknownPackage(Exception):
    """Billing has no record of the package: it does not exist, was not bought through billing,
    or was cancelled. ``renewals.explained`` tells which."""

    def __init__(self, package_id: str) -> None:
        super().__init__(package_id)
        self.package_id = package_id


def package_not_found(package_id: str) -> NotFound:
    return NotFound("PACKAGE_NOT_FOUND", f"no package {package_id!r}", package_id=package_id)


def not_renewable(package_id: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "PACKAGE_NOT_RENEWABLE",
        f"package {package_id!r} cannot be renewed: {why}",
        package_id=package_id,
    )


def _optional(value: int | None) -> datetime | None:
    return None if value is None else from_epoch_us(value)


def _us(value: datetime | None) -> int | None:
    return None if value is None else to_epoch_us(value)


def _to_sold(row) -> SoldPackage:
    return SoldPackage(
        package_id=row.package_id,
        account_id=row.account_id,
        offer_id=row.offer_id,
        region=row.region,
        order_id=row.order_id,
        expire_time=from_epoch_us(row.expire_time_us),
        auto_renew=row.enabled,
        lead_days=row.lead_days,
        next_attempt_time=_optional(row.next_attempt_us),
        last_attempt_time=_optional(row.last_attempt_us),
        last_failure_reason=row.last_failure_reason,
    )


async def load(uow: UnitOfWork, package_id: str, for_update: bool = False) -> SoldPackage:
    """The record of a package billing sold; ``UnknownPackage`` when there is none."""
    query = select(t.auto_renewals).where(t.auto_renewals.c.package_id == package_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    if row is None:
        raise UnknownPackage(package_id)
    return _to_sold(row)


async def record_purchase(ctx: BillingContext, uow: UnitOfWork, order) -> SoldPackage:
    """The record of the package a fulfilled purchase (``orders.Order``) granted."""
    now = ctx.now()
    await uow.session.execute(
        insert(t.auto_renewals).values(
            package_id=order.package_id,
            account_id=order.account_id,
            offer_id=order.offer_id,
            region=order.region,
            order_id=order.order_id,
            enabled=order.auto_renew,
            lead_days=DEFAULT_LEAD_DAYS,
            expire_time_us=to_epoch_us(order.expire_time),
            next_attempt_us=_us(
                scheduled_attempt(order.expire_time, DEFAULT_LEAD_DAYS, now, ctx.tz)
                if order.auto_renew
                else None
            ),
            update_time_us=to_epoch_us(now),
        )
    )
    return await load(uow, order.package_id)


async def save(ctx: BillingContext, uow: UnitOfWork, package_id: str, **values) -> SoldPackage:
    """Change a record: ``expire_time``, ``auto_renew``, ``lead_days``, ``next_attempt_time``,
    ``last_attempt_time``, ``last_failure_reason``."""
    columns = {
        "expire_time": ("expire_time_us", to_epoch_us),
        "auto_renew": ("enabled", bool),
        "lead_days": ("lead_days", int),
        "next_attempt_time": ("next_attempt_us", _us),
        "last_attempt_time": ("last_attempt_us", _us),
        "last_failure_reason": ("last_failure_reason", lambda v: v[:500]),
    }
    row = {columns[k][0]: columns[k][1](v) for k, v in values.items()}
    await uow.session.execute(
        update(t.auto_renewals)
        .where(t.auto_renewals.c.package_id == package_id)
        .values(update_time_us=to_epoch_us(ctx.now()), **row)
    )
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
    await uow.session.execute(
        delete(t.auto_renewals).where(t.auto_renewals.c.package_id == package_id)
    )
