"""Use cases of orders: purchase a package, place an order (purchases here, renewals by
``app/renewals.py``), read and list orders, and the ledger charge of an order's payment.

A purchase takes the price from the paying balance and records the order in one transaction
(idempotent by request_id); then the region's quota service is asked to grant the package
(``app/fulfilment.py``), so the package is effective from the payment instant even when it is
granted later. A purchase of ``quantity`` packages of the offer is one order and one payment
of ``quantity`` times the price; each package is granted on its own (``app/fulfilment.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from services.billing.adapters import accounts_repository as accounts_repo
from services.billing.adapters import ledger_repository as ledger
from services.billing.adapters import orders_repository as repo
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.domain.accounts import Account
from services.billing.domain.arrears import Standing, may_purchase
from services.billing.domain.bills import BillLine, BillLineKind
from services.billing.domain.orders import (
    LINE_KINDS,
    MAX_PACKAGES,
    NewOrder,
    Order,
    OrderKind,
    OrderPackage,
    OrderState,
    order_not_found,
)
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument
from shared.ids import new_id
from shared.money import format_amount, to_micros
from shared.projects import normalize_project_id
from shared.validity import ValidityOutOfRange, package_expire_time

__all__ = ["NewOrder", "Order", "OrderKind", "OrderState", "PurchaseInput", "order_not_found"]

log = logging.getLogger("allot.billing.orders")


@dataclass(frozen=True)
class PurchaseInput:
    account_id: str
    offer_id: str
    region: str
    enterprise_project_id: str
    effective_time: datetime | None
    auto_renew: bool
    quantity: int = 1
    # AUTO_REPLENISH for a purchase an auto-replenish setting makes (app/replenish.py).
    kind: OrderKind = OrderKind.PURCHASE


def check_quantity(quantity: int) -> int:
    """``quantity`` of PurchasePackage (packages of the offer): 0 means 1."""
    if quantity == 0:
        return 1
    if not 1 <= quantity <= MAX_PACKAGES:
        raise InvalidArgument("quantity", f"quantity must be between 1 and {MAX_PACKAGES}")
    return quantity


async def load_order(
    ctx: BillingContext, uow: UnitOfWork, order_id: str, for_update: bool = False
) -> Order:
    if not order_id:
        raise InvalidArgument("order_id", "order_id is required")
    order = await repo.get(uow, order_id, ctx.catalog.currency, for_update)
    if order is None:
        raise order_not_found(order_id)
    return order


def announce(ctx: BillingContext, uow: UnitOfWork, order: Order, previous: OrderState | None):
    ctx.events.order_updated(uow, order, previous, ctx.now())


async def charge(
    ctx: BillingContext,
    uow: UnitOfWork,
    order: Order,
    amount_micros: int,
    kind: BillLineKind,
    description: str,
    quantity: int | None = None,
) -> None:
    """Move the order's paying balance by ``amount_micros`` (signed effect: a payment is
    ``-price``, a refund ``+price``), with its ledger line (the order's region, API, project
    and calls, or ``quantity`` calls for part of the order), and follow the balance alert."""
    now = ctx.now()
    payer_id = order.paying_account_id
    before = await accounts_repo.locked_balance(uow, payer_id)
    await accounts_repo.set_balance(uow, payer_id, before + amount_micros, now)
    await accounts.balance_moved(ctx, uow, payer_id, before, before + amount_micros, now)
    await ledger.book(
        uow,
        BillLine(
            kind=kind,
            account_id=order.account_id,
            payer_account_id="" if payer_id == order.account_id else payer_id,
            amount_micros=amount_micros,
            region=order.region,
            api=order.api,
            enterprise_project_id=order.enterprise_project_id,
            quantity=order.quantity if quantity is None else quantity,
            order_id=order.order_id,
            description=description,
            occur_time=now,
        ),
    )


async def paying_accounts(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, price: int
) -> tuple[Account, Account]:
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


async def place(ctx: BillingContext, uow: UnitOfWork, new: NewOrder, description: str) -> Order:
    """Record a PENDING order and take its price from the paying balance (one transaction).
    An order given no packages has one: the order's own package, price and calls."""
    if not new.packages:
        only = OrderPackage(
            position=0,
            package_id=new.package_id,
            effective_time=new.effective_time,
            expire_time=new.expire_time,
            price_micros=new.price_micros,
            quantity=new.quantity,
        )
        new = replace(new, packages=(only,))
    order_id = new_id("ord")
    await repo.insert_order(uow, order_id, new, ctx.now())
    order = await load_order(ctx, uow, order_id)
    await charge(ctx, uow, order, -order.price_micros, LINE_KINDS[order.kind], description)
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
    count = spec.quantity
    price = to_micros(offer.price) * count
    account, payer = await paying_accounts(ctx, uow, spec.account_id, price)
    each = OrderPackage(
        position=0,
        package_id="",
        effective_time=effective,
        expire_time=expire,
        price_micros=to_micros(offer.price),
        quantity=offer.quantity,
    )
    new = NewOrder(
        kind=spec.kind,
        account_id=account.account_id,
        paying_account_id=payer.account_id,
        offer_id=offer.id,
        region=spec.region,
        api=offer.api,
        enterprise_project_id=project,
        quantity=offer.quantity * count,
        periods=1,
        price_micros=price,
        effective_time=effective,
        expire_time=expire,
        auto_renew=spec.auto_renew,
        packages=tuple(replace(each, position=i) for i in range(count)),
    )
    description = f"{offer.id} in {spec.region}"
    if count > 1:
        description += f" x {count}"
    return await place(ctx, uow, new, description)


async def list_orders(
    ctx: BillingContext,
    account_id: str,
    after_id: str | None,
    limit: int,
    regions: frozenset[str] | None = None,
) -> list[Order]:
    """Newest first (ids grow with time); only orders of `regions` when given (a
    region-limited token's, filtered in the query so pages stay full; docs/security.md)."""
    return await ctx.db.read(
        lambda uow: repo.list_orders(
            uow, account_id, after_id, limit, regions, ctx.catalog.currency
        )
    )
