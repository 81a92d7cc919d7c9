"""Fulfilment of orders: quota grants or renews the package of a PENDING order, a refusal
fails it with a full refund, and a purchase whose package has not started can be cancelled.

Quota is asked with the order id as request id, so a retried grant never grants twice. While
quota is unreachable the order stays PENDING and is offered again in the background
(``fulfil_pending``, every ``RETRY_PENDING`` of wall time) until it is FULFILLED. A purchase
whose package has not started yet (and was not renewed) can be cancelled for a full refund;
renewals cannot be cancelled.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from services.billing.adapters import orders_repository as repo
from services.billing.adapters.quota_client import QuotaUnavailable
from services.billing.app import packages
from services.billing.app.context import BillingContext
from services.billing.app.orders import announce, charge, load_order
from services.billing.domain.bills import BillLineKind
from services.billing.domain.orders import Order, OrderKind, OrderState
from services.billing.domain.packages import UnknownPackage
from shared.db import UnitOfWork
from shared.errors import AllotError, FailedPrecondition
from shared.validity import ONE_SECOND

log = logging.getLogger("allot.billing.orders")

# A pending order is offered to quota again this often while quota is unreachable.
RETRY_PENDING = timedelta(seconds=2)


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
    return await ctx.db.read(
        lambda uow: repo.earlier_pending_renewals(uow, order.package_id, order.expire_time)
    )


async def _set_state(
    ctx: BillingContext, uow: UnitOfWork, order: Order, state: OrderState, **values
) -> Order:
    await repo.set_state(uow, order.order_id, state, ctx.now(), **values)
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
    await charge(ctx, uow, order, order.price_micros, BillLineKind.REFUND, f"refund: {reason}")
    if order.kind != OrderKind.PURCHASE:
        await _renewal_failed(ctx, uow, order, reason)
    return await _set_state(ctx, uow, order, OrderState.FAILED, failure_reason=reason)


async def _renewal_failed(ctx: BillingContext, uow: UnitOfWork, order: Order, reason: str):
    """Quota refused a renewal for good (the package was revoked there, say): the package is
    sold to where it was before, and auto-renewal stops."""
    try:
        sold = await packages.load(uow, order.package_id, for_update=True)
    except UnknownPackage:
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
    ids = await ctx.db.read(lambda uow: repo.pending_ids(uow, 100))
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
        await charge(
            ctx, uow, current, current.price_micros, BillLineKind.REFUND, "refund: order cancelled"
        )
        if current.package_id:
            await packages.forget(uow, current.package_id)
        return await _set_state(ctx, uow, current, OrderState.CANCELLED)

    # A PENDING order's grant racing this cancel is revoked by fulfil() when it sees CANCELLED.
    return await ctx.db.transaction(mark)


async def _renewed(ctx: BillingContext, order: Order) -> bool:
    if not order.package_id:
        return False
    return await ctx.db.read(lambda uow: repo.has_live_renewal(uow, order.package_id))


async def _revoke(ctx: BillingContext, order: Order, package_id: str) -> None:
    await ctx.quota.revoke_package(
        f"cancel-{order.order_id}", order.region, package_id, "order cancelled"
    )
