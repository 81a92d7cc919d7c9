"""Fulfilment of orders: quota grants or renews the packages of a PENDING order, a refusal
fails it with a full refund, and a purchase whose packages have not started can be cancelled.

Quota is asked for each package of the order with its own request id derived from the order
id (``domain.orders.package_request_id``), so a retried grant never grants twice. A purchase
of several packages is FULFILLED once quota has granted them all; should quota refuse one for
good, those granted are revoked and the order FAILS with a full refund, as a single purchase
does. A batch renewal refused for every package FAILS the same way; refused for some, it is
FULFILLED with the refused packages' shares refunded (those renewed stay renewed). While
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
from services.billing.domain.orders import (
    PURCHASE_KINDS,
    Order,
    OrderKind,
    OrderPackage,
    OrderState,
    package_request_id,
)
from services.billing.domain.packages import UnknownPackage
from shared.db import UnitOfWork
from shared.errors import AllotError, FailedPrecondition
from shared.validity import ONE_SECOND

log = logging.getLogger("allot.billing.orders")

# A pending order is offered to quota again this often while quota is unreachable.
RETRY_PENDING = timedelta(seconds=2)


async def fulfil(ctx: BillingContext, order_id: str) -> Order:
    """Ask quota to grant or renew the packages of a PENDING order; it stays PENDING while
    quota is away. A renewal waits for the earlier renewals of its packages: quota never moves
    an expiry back, so they are applied in the order they were sold."""
    order = await ctx.db.read(lambda uow: load_order(ctx, uow, order_id))
    if order.state != OrderState.PENDING:
        return order
    refused: dict[int, str] = {}
    granted: list[str] = []
    try:
        if order.kind in PURCHASE_KINDS:
            granted = await _grant_all(ctx, order)
        else:
            for item in order.packages:
                for earlier in await _earlier_renewals(ctx, item):
                    if (await fulfil(ctx, earlier)).state == OrderState.PENDING:
                        return order
                try:
                    await ctx.quota.renew_package(
                        package_request_id(order.order_id, item.position),
                        order.region,
                        item.package_id,
                        expire_time=item.expire_time,
                        add_quantity=item.quantity,
                    )
                except QuotaUnavailable:
                    raise
                except AllotError as exc:
                    refused[item.position] = f"{exc.reason}: {exc.message}"
            if len(refused) == len(order.packages):
                raise _Refused("; ".join(sorted(set(refused.values()))))
    except QuotaUnavailable as exc:
        log.info("order %s stays pending: %s", order_id, exc)
        return order
    except (AllotError, _Refused) as exc:
        reason = str(exc) if isinstance(exc, _Refused) else f"{exc.reason}: {exc.message}"
        return await ctx.db.transaction(lambda uow: _fail(ctx, uow, order_id, reason))
    done = await ctx.db.transaction(lambda uow: _fulfilled(ctx, uow, order_id, granted, refused))
    if done.state == OrderState.CANCELLED:
        await _revoke(ctx, done, granted)  # cancelled while being granted
    return done


class _Refused(Exception):
    """Quota refused every renewal of a batch: the order fails as a whole."""


async def _grant_all(ctx: BillingContext, order: Order) -> list[str]:
    """Grant the purchase's packages, each with its own request id; when quota refuses one
    for good, those granted are revoked (the order then fails with a full refund)."""
    granted: list[str] = []
    for item in order.packages:
        try:
            package = await _grant(ctx, order, item)
        except QuotaUnavailable:
            raise
        except AllotError:
            await _revoke(ctx, order, granted)
            raise
        granted.append(package.package_id)
    return granted


def _grant(ctx: BillingContext, order: Order, item: OrderPackage):
    return ctx.quota.grant_package(
        package_request_id(order.order_id, item.position),
        account_id=order.account_id,
        region=order.region,
        api=order.api,
        enterprise_project_id=order.enterprise_project_id,
        quantity=item.quantity,
        effective_time=item.effective_time,
        expire_time=item.expire_time,
        order_id=order.order_id,
    )


async def _earlier_renewals(ctx: BillingContext, item: OrderPackage) -> list[str]:
    """PENDING renewals of the same package sold before this one (they end earlier)."""
    return await ctx.db.read(
        lambda uow: repo.earlier_pending_renewals(uow, item.package_id, item.expire_time)
    )


async def _set_state(
    ctx: BillingContext, uow: UnitOfWork, order: Order, state: OrderState, **values
) -> Order:
    await repo.set_state(uow, order.order_id, state, ctx.now(), **values)
    changed = await load_order(ctx, uow, order.order_id)
    announce(ctx, uow, changed, order.state)
    return changed


async def _fulfilled(
    ctx: BillingContext,
    uow: UnitOfWork,
    order_id: str,
    granted: list[str],
    refused: dict[int, str],
) -> Order:
    order = await load_order(ctx, uow, order_id, for_update=True)
    if order.state != OrderState.PENDING:
        return order  # cancelled meanwhile: fulfil() revokes what was granted
    if order.kind not in PURCHASE_KINDS:
        if not refused:
            return await _set_state(ctx, uow, order, OrderState.FULFILLED)
        return await _partly_renewed(ctx, uow, order, refused)
    await repo.set_package_ids(uow, order_id, granted)
    done = await _set_state(ctx, uow, order, OrderState.FULFILLED, package_id=granted[0])
    for package_id in granted:
        await packages.record_purchase(ctx, uow, done, package_id)
    return done


async def _partly_renewed(
    ctx: BillingContext, uow: UnitOfWork, order: Order, refused: dict[int, str]
) -> Order:
    """Quota renewed some packages of a batch and refused the others for good: those renewed
    stay renewed (an expiry is never moved back), the refused ones' shares are refunded in one
    line and they are sold to where they were before; the order is FULFILLED and its
    failure_reason names the refused packages."""
    items = [p for p in order.packages if p.position in refused]
    amount = sum(p.price_micros for p in items)
    names = ", ".join(p.package_id for p in items)
    reasons = "; ".join(f"{p.package_id}: {refused[p.position]}" for p in items)
    await charge(
        ctx,
        uow,
        order,
        amount,
        BillLineKind.REFUND,
        f"refund: renewal of {names} refused",
        quantity=sum(p.quantity for p in items),
    )
    for item in items:
        await _renewal_failed(ctx, uow, order, item, refused[item.position])
    return await _set_state(
        ctx, uow, order, OrderState.FULFILLED, failure_reason=f"partly refunded: {reasons}"
    )


async def _fail(ctx: BillingContext, uow: UnitOfWork, order_id: str, reason: str) -> Order:
    order = await load_order(ctx, uow, order_id, for_update=True)
    if order.state != OrderState.PENDING:
        return order
    await charge(ctx, uow, order, order.price_micros, BillLineKind.REFUND, f"refund: {reason}")
    if order.kind not in PURCHASE_KINDS:
        for item in order.packages:
            await _renewal_failed(ctx, uow, order, item, reason)
    return await _set_state(ctx, uow, order, OrderState.FAILED, failure_reason=reason)


async def _renewal_failed(
    ctx: BillingContext, uow: UnitOfWork, order: Order, item: OrderPackage, reason: str
):
    """Quota refused a renewal for good (the package was revoked there, say): the package is
    sold to where it was before, and auto-renewal stops."""
    try:
        sold = await packages.load(uow, item.package_id, for_update=True)
    except UnknownPackage:
        return
    values = {"auto_renew": False, "next_attempt_time": None, "last_failure_reason": reason}
    if sold.expire_time == item.expire_time:
        values["expire_time"] = item.effective_time - ONE_SECOND
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
    if order.kind not in PURCHASE_KINDS:
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
    # Revoke first: if quota is away nothing has changed and the caller can retry.
    await _revoke(ctx, order, list(order.package_ids))

    async def mark(uow: UnitOfWork) -> Order:
        current = await load_order(ctx, uow, order_id, for_update=True)
        if current.state == OrderState.CANCELLED:
            return current
        await charge(
            ctx, uow, current, current.price_micros, BillLineKind.REFUND, "refund: order cancelled"
        )
        for package_id in current.package_ids:
            await packages.forget(uow, package_id)
        return await _set_state(ctx, uow, current, OrderState.CANCELLED)

    # A PENDING order's grant racing this cancel is revoked by fulfil() when it sees CANCELLED.
    return await ctx.db.transaction(mark)


async def _renewed(ctx: BillingContext, order: Order) -> bool:
    if not order.package_ids:
        return False
    return await ctx.db.read(lambda uow: repo.has_live_renewal(uow, order.package_ids))


async def _revoke(ctx: BillingContext, order: Order, package_ids: list[str]) -> None:
    """Revoke the purchase's packages in quota, each with a request id of its own."""
    for position, package_id in enumerate(package_ids):
        await ctx.quota.revoke_package(
            f"cancel-{package_request_id(order.order_id, position)}",
            order.region,
            package_id,
            "order cancelled",
        )
