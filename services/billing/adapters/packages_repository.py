"""Billing's record of the packages it sold (table ``auto_renewals``): rows <->
``domain.packages.SoldPackage``, in the caller's unit of work."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, update

from services.billing.adapters import tables as t
from services.billing.domain.line_explanations import SoldInForce
from services.billing.domain.packages import SoldPackage
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_r = t.auto_renewals.c


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


async def get(uow: UnitOfWork, package_id: str, for_update: bool = False) -> SoldPackage | None:
    query = select(t.auto_renewals).where(_r.package_id == package_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    return None if row is None else _to_sold(row)


async def insert_sold(uow: UnitOfWork, sold: SoldPackage, now: datetime) -> None:
    await uow.session.execute(
        insert(t.auto_renewals).values(
            package_id=sold.package_id,
            account_id=sold.account_id,
            offer_id=sold.offer_id,
            region=sold.region,
            order_id=sold.order_id,
            enabled=sold.auto_renew,
            lead_days=sold.lead_days,
            expire_time_us=to_epoch_us(sold.expire_time),
            next_attempt_us=_us(sold.next_attempt_time),
            update_time_us=to_epoch_us(now),
        )
    )


# The fields of SoldPackage a change may set, with their columns.
_COLUMNS = {
    "expire_time": ("expire_time_us", to_epoch_us),
    "auto_renew": ("enabled", bool),
    "lead_days": ("lead_days", int),
    "next_attempt_time": ("next_attempt_us", _us),
    "last_attempt_time": ("last_attempt_us", _us),
    "last_failure_reason": ("last_failure_reason", lambda v: v[:500]),
}


async def update_sold(uow: UnitOfWork, package_id: str, now: datetime, **values) -> None:
    """Change fields of a record (the keys of ``_COLUMNS``)."""
    row = {_COLUMNS[k][0]: _COLUMNS[k][1](v) for k, v in values.items()}
    await uow.session.execute(
        update(t.auto_renewals)
        .where(_r.package_id == package_id)
        .values(update_time_us=to_epoch_us(now), **row)
    )


async def delete_sold(uow: UnitOfWork, package_id: str) -> None:
    await uow.session.execute(delete(t.auto_renewals).where(_r.package_id == package_id))


async def due_attempts(uow: UnitOfWork, now: datetime, limit: int) -> list[str]:
    """Packages whose auto-renewal attempt is due at ``now``, earliest first."""
    query = (
        select(_r.package_id)
        .where(_r.enabled.is_(True), _r.next_attempt_us <= to_epoch_us(now))
        .order_by(_r.next_attempt_us, _r.package_id)
        .limit(limit)
    )
    return [r.package_id for r in await uow.rows(query)]


async def sold_in_force(
    uow: UnitOfWork,
    account_id: str,
    api: str,
    regions: list[str],
    start: datetime,
    end: datetime,
) -> list[SoldInForce]:
    """The account's packages of ``api`` sold in ``regions`` and in force at some instant of
    [``start``, ``end``] (purchase effective time, expiry as renewed), by package id; at most
    1,000 (ExplainBillLine's near misses in other regions)."""
    if not regions:
        return []
    o = t.orders.c
    query = (
        select(
            _r.package_id,
            _r.region,
            _r.expire_time_us,
            o.api,
            o.enterprise_project_id,
            o.effective_time_us,
        )
        .join(t.orders, o.order_id == _r.order_id)
        .where(
            _r.account_id == account_id,
            _r.region.in_(sorted(set(regions))),
            o.api == api,
            o.effective_time_us <= to_epoch_us(end),
            _r.expire_time_us + 1_000_000 > to_epoch_us(start),
        )
        .order_by(_r.package_id)
        .limit(1000)
    )
    return [
        SoldInForce(
            package_id=r.package_id,
            region=r.region,
            api=r.api,
            enterprise_project_id=r.enterprise_project_id,
            effective_time=from_epoch_us(r.effective_time_us),
            expire_time=from_epoch_us(r.expire_time_us),
        )
        for r in await uow.rows(query)
    ]
