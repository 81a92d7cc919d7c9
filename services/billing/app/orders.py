"""Use cases of orders: purchase a package, cancel it before it starts, fulfil pending ones
(purchases and renewals; renewals are placed by ``app/renewals.py``).

A purchase takes the price from the paying balance and records the order in one transaction
(idempotent by request_id); then the region's quota service is asked to grant the package with
the order id as its request id, so a retried grant never grants twice. While quota is
unreachable the order stays PENDING and is retried in the background until it is FULFILLED;
the package is effective from the payment instant even when it is granted later. A grant that
quota refuses fails the order and refunds it. A purchase whose package has not started yet
(and was not renewed) can be cancelled for a full refund; renewals cannot be cancelled.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update

from services.billing.adapters import tables as t
from services.billing.adapters.quota_client import QuotaUnavailable
from services.billing.app import accounts, packages
from services.billing.app.context import BillingContext
from services.billing.domain.arrears import Standing, may_purchase
from services.billing.domain.bills import BillLineKind
from shared.db import UnitOfWork
from shared.errors import AllotError, FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id
from shared.money import format_amount, to_micros
from shared.projects import normalize_project_id
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validity import ONE_SECOND, ValidityOutOfRange, package_expire_time

log = logging.getLogger("allot.billing.orders")

# A pending order is offered to quota again this often while quota is unreachable.
RETRY_PENDING = timedelta(seconds=2)


class OrderKind(enum.IntEnum):
    PURCHASE = 1
    RENEWAL = 2
    AUTO_RENEWAL = 3


class OrderState(enum.IntEnum):
    PENDING = 1
    FULFILLED = 2
    FAILED = 3
    CANCELLED = 4


@dataclass(frozen=True, kw_only=True)
class NewOrder:
    """An order to place: paid at once, PENDING until quota has granted or renewed."""

    kind: OrderKind
    account_id: str
    paying_account_id: str
    offer_id: str
    region: str
    api: str
    enterprise_project_id: str
    quantity: int
    periods: int
    amount_micros: int
    effective_time: datetime
    expire_time: datetime
    package_id: str = ""
    auto_renew: bool = False


@dataclass(frozen=True, kw_only=True)
class Order(NewOrder):
    """A placed order: what was bought (``NewOrder``) and where it stands."""

    order_id: str
    state: OrderState
    currency_code: str
    failure_reason: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class PurchaseInput:
    account_id: str
    offer_id: str
    region: str
    enterprise_project_id: str
    effective_time: datetime | None
    auto_renew: bool


def order_not_found(order_id: str) -> NotFound:
    return NotFound("ORDER_NOT_FOUND", f"no order {order_id!r}", order_id=order_id)


def _to_order(row, currency: str) -> Order:
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
        amount_micros=row.amount_micros,
        currency_code=currency,
        package_id=row.package_id,
        effective_time=from_epoch_us(row.effective_time_us),
        expire_time=from_epoch_us(row.expire_time_us),
        auto_renew=row.auto_renew,
        failure_reason=row.failure_reason,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
    )


async def load_order(
    ctx: BillingContext, uow: UnitOfWork, order_id: str, for_update: bool = False
) -> Order:
    if not order_id:
        raise InvalidArgument("order_id", "order_id is required")
    query = select(t.orders).where(t.orders.c.order_id == order_id)
    if for_update:
        query = query.with_for_update()
    row = (await uow.session.execute(query)).first()
    if row is None:
        raise order_not_found(order_id)
    return _to_order(row, ctx.catalog.currency)


def announce(ctx: BillingContext, uow: UnitOfWork, order: Order, previous: OrderState | None):
    ctx.events.order_updated(uow, order, previous, ctx.now())


async def _charge(
    ctx: BillingContext,
    uow: UnitOfWork,
    order: Order,
    amount: int,
    kind: BillLineKind,
    description: str,
) -> None:
    """Move `amount` (signed effect) on the order's paying balance, with its ledger line (the
    order's region, API, project and calls), and follow the balance alert."""
    a = t.accounts.c
    now = ctx.now()
    now_us = to_epoch_us(now)
    payer_id = order.paying_account_id
    before = (
        await uow.session.execute(
            select(a.balance_micros).where(a.account_id == payer_id).with_for_update()
        )
    ).scalar_one()
    await uow.session.execute(
        update(t.accounts)
        .where(a.account_id == payer_id)
        .values(balance_micros=before + amount, update_time_us=now_us)
    )
    await accounts.balance_moved(ctx, uow, payer_id, before, before + amount, now)
    await uow.session.execute(
        insert(t.ledger).values(
            entry_id=new_id("led"),
            account_id=order.account_id,
            paying_account_id=order.paying_account_id,
            kind=int(kind),
            amount_micros=amount,
            region=order.region,
            api=order.api,
            enterprise_project_id=order.enterprise_project_id,
            quantity=order.quantity,
            order_id=order.order_id,
            description=description[:500],
            occur_time_us=now_us,
        )
    )


async def paying_accounts(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, price: int
) -> tuple[accounts.Account, accounts.Account]:
    """The account and the account that pays for it (locked), when it may pay ``price`` now:
    ``ACCOUNT_IN_ARREARS`` or ``INSUFFICIENT_BALANCE`` otherwise."""
    account = await accounts.load_account(uow, account_id)
    payer_id = account.master_account_id or account.account_id
    payer = await accounts.load_account(uow, payer_id, for_update=True)
    if not may_purchase(Standing(payer.standing)):
        raise FailedPrecondition(
            "ACCOUNT_IN_ARREARS",
            f"account {payer_id!r} is in arrears ({payer.standing.name}): top up first",
            account_id=payer_id,
            standing=payer.standing.name,
        )
    if payer.balance_micros < price:
        raise FailedPrecondition(
            "INSUFFICIENT_BALANCE",
            f"the price {format_amount(price, payer.currency_code)} {payer.currency_code}"
            " exceeds the balance",
            account_id=payer_id,
            price=format_amount(price, payer.currency_code),
        )
    return account, payer


_LINE_KINDS = {
    OrderKind.PURCHASE: BillLineKind.PACKAGE_PURCHASE,
    OrderKind.RENEWAL: BillLineKind.PACKAGE_RENEWAL,
    OrderKind.AUTO_RENEWAL: BillLineKind.PACKAGE_RENEWAL,
}


async def place(ctx: BillingContext, uow: UnitOfWork, new: NewOrder, description: str) -> Order:
    """Record a PENDING order and take its amount from the paying balance (one transaction)."""
    order_id = new_id("ord")
    now_us = to_epoch_us(ctx.now())
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
            amount_micros=new.amount_micros,
            package_id=new.package_id,
            effective_time_us=to_epoch_us(new.effective_time),
            expire_time_us=to_epoch_us(new.expire_time),
            auto_renew=new.auto_renew,
            create_time_us=now_us,
            update_time_us=now_us,
        )
    )
    order = await load_order(ctx, uow, order_id)
    await _charge(ctx, uow, order, -order.amount_micros, _LINE_KINDS[order.kind], description)
    announce(ctx, uow, order, None)
    return order


async def purchase(ctx: BillingContext, uow: UnitOfWork, spec: PurchaseInput) -> Order:
    """Pay for an offer and record the PENDING order (quota is asked after the commit)."""
    now = ctx.now()
    offer = ctx.catalog.offers.get(spec.offer_id)
    if offer is None:
        raise InvalidArgument(
            "offer_id",
            f"unknown offer {spec.offer_id!r}",
            reason="UNKNOWN_OFFER",
            offer_id=spec.offer_id,
        )
    ctx.check_region(spec.region)
    if spec.region not in offer.regions:
        raise InvalidArgument(
            "region",
            f"offer {offer.id!r} is not sold in {spec.region!r}",
            reason="OFFER_NOT_IN_REGION",
        )
    project = spec.enterprise_project_id
    if project and normalize_project_id(project) != project:
        raise InvalidArgument(
            "enterprise_project_id", "enterprise_project_id must be 1-64 letters, digits, - or _"
        )
    effective = spec.effective_time or now
    if effective < now:
        raise InvalidArgument("effective_time", "effective_time must not lie in the past")
    try:
        expire = package_expire_time(effective, offer.validity_months, ctx.tz)
    except ValidityOutOfRange:
        raise InvalidArgument(
            "effective_time", "effective_time is too late: the package would run past 9000-01-01"
        ) from None
    price = to_micros(offer.price)
    account, payer = await paying_accounts(ctx, uow, spec.account_id, price)
    new = NewOrder(
        kind=OrderKind.PURCHASE,
        account_id=account.account_id,
        paying_account_id=payer.account_id,
        offer_id=offer.id,
        region=spec.region,
        api=offer.api,
        enterprise_project_id=project,
        quantity=offer.quantity,
        periods=1,
        amount_micros=price,
        effective_time=effective,
        expire_time=expire,
        auto_renew=spec.auto_renew,
    )
    return await place(ctx, uow, new, f"{offer.id} in {spec.region}")


async def fulfil(ctx: BillingContext, order_id: str) -> Order:
    """Ask quota to grant or renew the package of a PENDING order; it stays PENDING while quota
    is away. A renewal waits for the earlier renewals of its package: quota never moves an
    expiry back, so they are applied in the order they were sold."""
    order = await ctx.db.read(lambda uow: load_order(ctx, uow, order_id))
    if order.state != OrderState.PENDING:
        return order
    try:
        if order.kind == OrderKind.PURCHASE:
            package = await _grant(ctx, order)
        else:
            for earlier in await _earlier_renewals(ctx, order):
                if (await fulfil(ctx, earlier)).state == OrderState.PENDING:
                    return order
            package = await ctx.quota.renew_package(
                order.order_id,
                order.region,
                order.package_id,
                expire_time=order.expire_time,
                add_quantity=order.quantity,
            )
    except QuotaUnavailable as exc:
        log.info("order %s stays pending: %s", order_id, exc)
        return order
    except AllotError as exc:
        reason = f"{exc.reason}: {exc.message}"
        return await ctx.db.transaction(lambda uow: _fail(ctx, uow, order_id, reason))
    done = await ctx.db.transaction(lambda uow: _fulfilled(ctx, uow, order_id, package))
    if done.state == OrderState.CANCELLED:
        await _revoke(ctx, done, package.package_id)  # cancelled while being granted
    return done


def _grant(ctx: BillingContext, order: Order):
    return ctx.quota.grant_package(
        order.order_id,
        account_id=order.account_id,
        region=order.region,
        api=order.api,
        enterprise_project_id=order.enterprise_project_id,
        quantity=order.quantity,
        effective_time=order.effective_time,
        expire_time=order.expire_time,
        order_id=order.order_id,
    )


async def _earlier_renewals(ctx: BillingContext, order: Order) -> list[str]:
    """PENDING renewals of the same package sold before this one (they end earlier)."""
    o = t.orders.c
    query = (
        select(o.order_id)
        .where(
            o.package_id == order.package_id,
            o.state == int(OrderState.PENDING),
            o.expire_time_us < to_epoch_us(order.expire_time),
        )
        .order_by(o.expire_time_us)
    )
    return [r.order_id for r in await ctx.db.read(lambda uow: uow.rows(query))]


async def _set_state(
    ctx: BillingContext, uow: UnitOfWork, order: Order, state: OrderState, **values
) -> Order:
    await uow.session.execute(
        update(t.orders)
        .where(t.orders.c.order_id == order.order_id)
        .values(
            state=int(state),
            update_time_us=to_epoch_us(ctx.now()),
            **values,
        )
    )
    changed = await load_order(ctx, uow, order.order_id)
    announce(ctx, uow, changed, order.state)
    return changed


async def _fulfilled(ctx: BillingContext, uow: UnitOfWork, order_id: str, package) -> Order:
    order = await load_order(ctx, uow, order_id, for_update=True)
    if order.state != OrderState.PENDING:
        return order  # cancelled meanwhile: fulfil() revokes what was granted
    if order.kind != OrderKind.PURCHASE:
        return await _set_state(ctx, uow, order, OrderState.FULFILLED)
    done = await _set_state(ctx, uow, order, OrderState.FULFILLED, package_id=package.package_id)
    await packages.record_purchase(ctx, uow, done)
    return done


async def _fail(ctx: BillingContext, uow: UnitOfWork, order_id: str, reason: str) -> Order:
    order = await load_order(ctx, uow, order_id, for_update=True)
    if order.state != OrderState.PENDING:
        return order
    await _charge(ctx, uow, order, order.amount_micros, BillLineKind.REFUND, f"refund: {reason}")
    if order.kind != OrderKind.PURCHASE:
        await _renewal_failed(ctx, uow, order, reason)
    return await _set_state(ctx, uow, order, OrderState.FAILED, failure_reason=reason[:500])


async def _renewal_failed(ctx: BillingContext, uow: UnitOfWork, order: Order, reason: str):
    """Quota refused a renewal for good (the package was revoked there, say): the package is
    sold to where it was before, and auto-renewal stops."""
    try:
        sold = await packages.load(uow, order.package_id, for_update=True)
    except packages.UnknownPackage:
        return
    values = {"auto_renew": False, "next_attempt_time": None, "last_failure_reason": reason}
    if sold.expire_time == order.expire_time:
        values["expire_time"] = order.effective_time - ONE_SECOND
    sold = await packages.save(ctx, uow, sold.package_id, **values)
    if order.kind == OrderKind.AUTO_RENEWAL:
        ctx.events.auto_renew_failed(uow, sold, reason.partition(":")[0], ctx.now())


async def fulfil_pending(ctx: BillingContext) -> int:
    """Offer PENDING orders to quota again, oldest first. It runs every RETRY_PENDING of wall
    time (not the business clock): quota coming back must not wait for a clock to move."""
    o = t.orders.c
    query = (
        select(o.order_id).where(o.state == int(OrderState.PENDING)).order_by(o.order_id).limit(100)
    )
    ids = [r.order_id for r in await ctx.db.read(lambda uow: uow.rows(query))]
    done = 0
    for order_id in ids:
        if (await fulfil(ctx, order_id)).state != OrderState.PENDING:
            done += 1
    return done


async def cancel(ctx: BillingContext, order_id: str, guard) -> Order:
    """Cancel an order whose package has not started: revoke it in quota, refund in full."""
    order = await ctx.db.read(lambda uow: load_order(ctx, uow, order_id))
    guard(order)
    if order.state == OrderState.CANCELLED:
        return order
    if order.kind != OrderKind.PURCHASE:
        raise FailedPrecondition(
            "ORDER_NOT_CANCELLABLE",
            "a renewal cannot be cancelled",
            order_id=order_id,
            kind=order.kind.name,
        )
    if order.state not in (OrderState.PENDING, OrderState.FULFILLED) or (
        order.effective_time <= ctx.now()
    ):
        raise FailedPrecondition(
            "ORDER_NOT_CANCELLABLE",
            "only orders whose package has not started can be cancelled",
            order_id=order_id,
            state=order.state.name,
        )
    if await _renewed(ctx, order):
        raise FailedPrecondition(
            "ORDER_NOT_CANCELLABLE",
            "the package was renewed already",
            order_id=order_id,
            state=order.state.name,
        )
    if order.package_id:
        # Revoke first: if quota is away nothing has changed and the caller can retry.
        await _revoke(ctx, order, order.package_id)

    async def mark(uow: UnitOfWork) -> Order:
        current = await load_order(ctx, uow, order_id, for_update=True)
        if current.state == OrderState.CANCELLED:
            return current
        await _charge(
            ctx, uow, current, current.amount_micros, BillLineKind.REFUND, "refund: order cancelled"
        )
        if current.package_id:
            await packages.forget(uow, current.package_id)
        return await _set_state(ctx, uow, current, OrderState.CANCELLED)

    # A PENDING order's grant racing this cancel is revoked by fulfil() when it sees CANCELLED.
    return await ctx.db.transaction(mark)


async def _renewed(ctx: BillingContext, order: Order) -> bool:
    if not order.package_id:
        return False
    o = t.orders.c
    query = select(o.order_id).where(
        o.package_id == order.package_id,
        o.kind != int(OrderKind.PURCHASE),
        o.state.in_([int(OrderState.PENDING), int(OrderState.FULFILLED)]),
    )
    return bool(await ctx.db.read(lambda uow: uow.rows(query)))


async def _revoke(ctx: BillingContext, order: Order, package_id: str) -> None:
    await ctx.quota.revoke_package(
        f"cancel-{order.order_id}", order.region, package_id, "order cancelled"
    )


async def list_orders(
    ctx: BillingContext,
    account_id: str,
    after_id: str | None,
    limit: int,
    regions: frozenset[str] | None = None,
) -> list[Order]:
    """Newest first (ids grow with time); only orders of `regions` when given (a
    region-limited token's, filtered in the query so pages stay full; docs/security.md)."""
    o = t.orders.c
    query = (
        select(t.orders).where(o.account_id == account_id).order_by(o.order_id.desc()).limit(limit)
    )
    if regions is not None:
        query = query.where(o.region.in_(sorted(regions)))
    if after_id:
        query = query.where(o.order_id < after_id)
    rows = await ctx.db.read(lambda uow: uow.rows(query))
    return [_to_order(r, ctx.catalog.currency) for r in rows]
