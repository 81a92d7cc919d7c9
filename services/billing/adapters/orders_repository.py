"""Orders: rows <-> ``domain.orders.Order``, in the caller's unit of work.

The ``orders`` table keeps an order's price in its ``amount_micros`` column (non-negative:
the order's ``price_micros``; its ledger lines carry the signed effects). Each order's packages
are rows of ``order_packages`` (one at least); an order's ``package_id`` is its first.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert, select, update

from services.billing.adapters import tables as t
from services.billing.domain.orders import (
    PURCHASE_KINDS,
    NewOrder,
    Order,
    OrderKind,
    OrderPackage,
    OrderState,
)
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_o = t.orders.c
_p = t.order_packages.c


def _to_package(row) -> OrderPackage:
    return OrderPackage(
        position=row.position,
        package_id=row.package_id,
        effective_time=from_epoch_us(row.effective_time_us),
        expire_time=from_epoch_us(row.expire_time_us),
        price_micros=row.amount_micros,
        quantity=row.quantity,
    )


async def _packages(uow: UnitOfWork, order_ids: list[str]) -> dict[str, tuple[OrderPackage, ...]]:
    if not order_ids:
        return {}
    query = (
        select(t.order_packages)
        .where(_p.order_id.in_(order_ids))
        .order_by(_p.order_id, _p.position)
    )
    found: dict[str, list[OrderPackage]] = {}
    for row in await uow.rows(query):
        found.setdefault(row.order_id, []).append(_to_package(row))
    return {order_id: tuple(items) for order_id, items in found.items()}


def _to_order(row, currency: str, packages: tuple[OrderPackage, ...]) -> Order:
    return Order(
        order_id=row.order_id,
        account_id=row.account_id,
        paying_account_id=row.paying_account_id,
        kind=OrderKind(row.kind),
        state=OrderState(row.state),
        offer_id=row.offer_id,
        region=row.region,
        api=row.api,
        enterprise_project_id=row.enterprise_project_id,
        quantity=row.quantity,
        periods=row.periods,
        price_micros=row.amount_micros,
        currency_code=currency,
        package_id=row.package_id,
        effective_time=from_epoch_us(row.effective_time_us),
        expire_time=from_epoch_us(row.expire_time_us),
        auto_renew=row.auto_renew,
        failure_reason=row.failure_reason,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
        packages=packages,
    )


async def get(
    uow: UnitOfWork, order_id: str, currency: str, for_update: bool = False
) -> Order | None:
    query = select(t.orders).where(_o.order_id == order_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    if row is None:
        return None
    packages = await _packages(uow, [order_id])
    return _to_order(row, currency, packages.get(order_id, ()))


async def insert_order(uow: UnitOfWork, order_id: str, new: NewOrder, now: datetime) -> None:
    """Record ``new`` as a PENDING order."""
    now_us = to_epoch_us(now)
    await uow.session.execute(
        insert(t.orders).values(
            order_id=order_id,
            account_id=new.account_id,
            paying_account_id=new.paying_account_id,
            kind=int(new.kind),
            state=int(OrderState.PENDING),
            offer_id=new.offer_id,
            region=new.region,
            api=new.api,
            enterprise_project_id=new.enterprise_project_id,
            quantity=new.quantity,
            periods=new.periods,
            amount_micros=new.price_micros,
            package_id=new.package_id,
            effective_time_us=to_epoch_us(new.effective_time),
            expire_time_us=to_epoch_us(new.expire_time),
            auto_renew=new.auto_renew,
            create_time_us=now_us,
            update_time_us=now_us,
        )
    )
    await uow.session.execute(
        insert(t.order_packages),
        [
            {
                "order_id": order_id,
                "position": p.position,
                "package_id": p.package_id,
                "effective_time_us": to_epoch_us(p.effective_time),
                "expire_time_us": to_epoch_us(p.expire_time),
                "amount_micros": p.price_micros,
                "quantity": p.quantity,
            }
            for p in new.packages
        ],
    )


async def set_package_ids(uow: UnitOfWork, order_id: str, package_ids: list[str]) -> None:
    """The packages a purchase's grants created, in the order of its rows."""
    for position, package_id in enumerate(package_ids):
        await uow.session.execute(
            update(t.order_packages)
            .where(_p.order_id == order_id, _p.position == position)
            .values(package_id=package_id)
        )


async def set_state(
    uow: UnitOfWork,
    order_id: str,
    state: OrderState,
    now: datetime,
    *,
    package_id: str | None = None,
    failure_reason: str | None = None,
) -> None:
    values: dict = {"state": int(state), "update_time_us": to_epoch_us(now)}
    if package_id is not None:
        values["package_id"] = package_id
    if failure_reason is not None:
        values["failure_reason"] = failure_reason[:500]
    await uow.session.execute(update(t.orders).where(_o.order_id == order_id).values(**values))


async def earlier_pending_renewals(uow: UnitOfWork, package_id: str, before: datetime) -> list[str]:
    """PENDING orders renewing the package to an expiry before ``before``, earliest first."""
    query = (
        select(_p.order_id)
        .join(t.orders, _o.order_id == _p.order_id)
        .where(
            _p.package_id == package_id,
            _o.kind.not_in([int(k) for k in PURCHASE_KINDS]),
            _o.state == int(OrderState.PENDING),
            _p.expire_time_us < to_epoch_us(before),
        )
        .order_by(_p.expire_time_us)
    )
    return [r.order_id for r in await uow.rows(query)]


async def pending_ids(uow: UnitOfWork, limit: int) -> list[str]:
    """PENDING orders, oldest first."""
    query = (
        select(_o.order_id)
        .where(_o.state == int(OrderState.PENDING))
        .order_by(_o.order_id)
        .limit(limit)
    )
    return [r.order_id for r in await uow.rows(query)]


async def has_live_renewal(uow: UnitOfWork, package_ids: tuple[str, ...]) -> bool:
    """Whether a renewal of any of the packages is PENDING or FULFILLED."""
    query = (
        select(_p.order_id)
        .join(t.orders, _o.order_id == _p.order_id)
        .where(
            _p.package_id.in_(package_ids),
            _o.kind.not_in([int(k) for k in PURCHASE_KINDS]),
            _o.state.in_([int(OrderState.PENDING), int(OrderState.FULFILLED)]),
        )
        .limit(1)
    )
    return bool(await uow.rows(query))


async def package_owner(uow: UnitOfWork, package_id: str) -> str | None:
    """The account of any order of the package (None: billing never sold it)."""
    query = (
        select(_o.account_id)
        .join(t.order_packages, _o.order_id == _p.order_id)
        .where(_p.package_id == package_id)
        .limit(1)
    )
    return (await uow.session.execute(query)).scalar()


async def list_orders(
    uow: UnitOfWork,
    account_id: str,
    after_id: str | None,
    limit: int,
    regions: frozenset[str] | None,
    currency: str,
) -> list[Order]:
    """Newest first (ids grow with time); only orders of ``regions`` when given."""
    query = (
        select(t.orders)
        .where(_o.account_id == account_id)
        .order_by(_o.order_id.desc())
        .limit(limit)
    )
    if regions is not None:
        query = query.where(_o.region.in_(sorted(regions)))
    if after_id:
        query = query.where(_o.order_id < after_id)
    rows = await uow.rows(query)
    packages = await _packages(uow, [r.order_id for r in rows])
    return [_to_order(r, currency, packages.get(r.order_id, ())) for r in rows]
