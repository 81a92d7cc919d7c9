"""Use case of RenewPackages: renew several packages of an account to one common expiry date,
in one order and one payment (docs/design/billing.md, "Orders of several packages").

Each package is priced pro rata by whole days (``domain.renewal.pro_rata``) and the order's
price is the sum of the shares. The common date must lie after every package's current expiry
date (``EXPIRE_DATE_NOT_AFTER_EXPIRY`` otherwise) and each package must be renewable by hand
(``app/renewals.py``: billing sold it, it is not cancelled, and it expired no more than 15 days
ago). The order is one bill line, so its packages must share region, API and enterprise
project (``PACKAGES_NOT_ALIKE``); their offers may differ. Quota is asked after the commit, for
each package with its own request id (``app/fulfilment.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from services.billing.app import orders, packages
from services.billing.app.context import BillingContext
from services.billing.app.packages import SoldPackage, not_renewable
from services.billing.domain.orders import MAX_PACKAGES, OrderPackage
from services.billing.domain.renewal import pro_rata, renewal_allowed
from shared.auth import check_scope
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition, InvalidArgument
from shared.money import to_micros
from shared.validity import ONE_SECOND, add_months

# The common expiry date may lie at most this many months ahead of today.
MAX_MONTHS_AHEAD = 120


def check_package_ids(package_ids: list[str]) -> list[str]:
    """``package_ids`` of RenewPackages: 1 to MAX_PACKAGES distinct, non-empty ids."""
    if not package_ids:
        raise InvalidArgument("package_ids", "package_ids is required")
    if len(package_ids) > MAX_PACKAGES:
        raise InvalidArgument("package_ids", f"at most {MAX_PACKAGES} packages per order")
    if any(not p for p in package_ids):
        raise InvalidArgument("package_ids", "package_ids must not contain an empty id")
    if len(set(package_ids)) != len(package_ids):
        raise InvalidArgument("package_ids", "package_ids must not repeat a package")
    return list(package_ids)


@dataclass(frozen=True)
class _Renewed:
    sold: SoldPackage
    api: str
    project: str
    item: OrderPackage


async def renew_many(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    package_ids: list[str],
    expire_date: date,
) -> orders.Order:
    """RenewPackages: place the renewal of every package to ``expire_date`` (one transaction;
    quota is asked after the commit)."""
    today = ctx.now().astimezone(ctx.tz).date()
    if expire_date < today:
        raise InvalidArgument("expire_date", "expire_date must not lie in the past")
    if expire_date > add_months(today, MAX_MONTHS_AHEAD):
        raise InvalidArgument(
            "expire_date", f"expire_date must lie within {MAX_MONTHS_AHEAD} months from today"
        )
    # Lock the packages' records in one order (concurrent batches never wait on each other
    # in a circle); the order's packages keep the caller's order.
    sold = {p: await packages.load(uow, p, for_update=True) for p in sorted(package_ids)}
    renewed = [
        await _share(ctx, uow, account_id, sold[p], position, expire_date)
        for position, p in enumerate(package_ids)
    ]
    first = renewed[0]
    for other in renewed[1:]:
        if (other.sold.region, other.api, other.project) != (
            first.sold.region,
            first.api,
            first.project,
        ):
            raise FailedPrecondition(
                "PACKAGES_NOT_ALIKE",
                "packages renewed together must share region, API and enterprise project:"
                f" {other.sold.package_id!r} differs from {first.sold.package_id!r}",
                package_id=other.sold.package_id,
            )
    price = sum(r.item.price_micros for r in renewed)
    account, payer = await orders.paying_accounts(ctx, uow, account_id, price)
    offers = {r.sold.offer_id for r in renewed}
    expire = first.item.expire_time
    new = orders.NewOrder(
        kind=orders.OrderKind.RENEWAL,
        account_id=account.account_id,
        paying_account_id=payer.account_id,
        offer_id=first.sold.offer_id if len(offers) == 1 else "",
        region=first.sold.region,
        api=first.api,
        enterprise_project_id=first.project,
        quantity=sum(r.item.quantity for r in renewed),
        periods=0,
        price_micros=price,
        effective_time=min(r.item.effective_time for r in renewed),
        expire_time=expire,
        package_id=first.sold.package_id,
        packages=tuple(r.item for r in renewed),
    )
    description = (
        f"{len(renewed)} package(s) in {first.sold.region} renewed to {expire_date.isoformat()}"
        " pro rata"
    )
    order = await orders.place(ctx, uow, new, description)
    for r in renewed:
        await packages.reschedule(ctx, uow, r.sold, expire)
    return order


async def _share(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    sold: SoldPackage,
    position: int,
    expire_date: date,
) -> _Renewed:
    """One package's checks and pro-rata share."""
    package_id = sold.package_id
    if sold.account_id != account_id:
        raise packages.package_not_found(package_id)
    check_scope(sold.account_id, sold.region)
    if not renewal_allowed(sold.expire_time, ctx.now()):
        raise not_renewable(package_id, "it expired more than 15 days ago")
    offer = ctx.catalog.offers.get(sold.offer_id)
    if offer is None:
        raise not_renewable(package_id, f"its offer {sold.offer_id!r} is no longer sold")
    share = pro_rata(
        sold.expire_time,
        expire_date,
        offer.validity_months,
        to_micros(offer.price),
        offer.quantity,
        ctx.tz,
    )
    if share.days < 1:
        raise FailedPrecondition(
            "EXPIRE_DATE_NOT_AFTER_EXPIRY",
            f"package {package_id!r} already runs to {expire_date.isoformat()} or later",
            field="expire_date",
            package_id=package_id,
        )
    purchase = await orders.load_order(ctx, uow, sold.order_id)
    item = OrderPackage(
        position=position,
        package_id=package_id,
        effective_time=sold.expire_time + ONE_SECOND,
        expire_time=share.expire_time,
        price_micros=share.price_micros,
        quantity=share.quantity,
    )
    return _Renewed(sold, offer.api, purchase.enterprise_project_id, item)
