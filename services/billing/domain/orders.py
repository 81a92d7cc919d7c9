"""Orders: a package purchase or renewal, paid at once, PENDING until quota has granted or
renewed the package, then FULFILLED (or FAILED and refunded, or CANCELLED and refunded).

An order may buy several packages of one offer, or renew several packages to one common
expiry date (docs/design/billing.md, "Orders of several packages"): one order, one payment,
one ``OrderPackage`` per package, each granted or renewed in quota with its own request id
(``package_request_id``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from services.billing.domain.bills import BillLineKind
from shared.errors import NotFound


class OrderKind(enum.IntEnum):
    PURCHASE = 1
    RENEWAL = 2
    AUTO_RENEWAL = 3
    AUTO_REPLENISH = 4


# Orders that buy new packages (granted in quota); every other kind renews sold packages.
PURCHASE_KINDS = frozenset({OrderKind.PURCHASE, OrderKind.AUTO_REPLENISH})


class OrderState(enum.IntEnum):
    PENDING = 1
    FULFILLED = 2
    FAILED = 3
    CANCELLED = 4


# The ledger line an order's payment is booked as.
LINE_KINDS = {
    OrderKind.PURCHASE: BillLineKind.PACKAGE_PURCHASE,
    OrderKind.RENEWAL: BillLineKind.PACKAGE_RENEWAL,
    OrderKind.AUTO_RENEWAL: BillLineKind.PACKAGE_RENEWAL,
    OrderKind.AUTO_REPLENISH: BillLineKind.PACKAGE_PURCHASE,
}


# The most packages one order may buy or renew.
MAX_PACKAGES = 100


@dataclass(frozen=True, kw_only=True)
class OrderPackage:
    """One package of an order: its share of the price and of the calls, and the validity it
    is granted or renewed to. ``package_id`` is empty while a purchase is PENDING;
    ``effective_time`` is the package's first covered instant for a purchase, and its old
    expiry + 1 s for a renewal."""

    position: int
    package_id: str
    effective_time: datetime
    expire_time: datetime
    price_micros: int
    quantity: int


def package_request_id(order_id: str, position: int) -> str:
    """The request id quota is asked with for the order's package at ``position``: the order
    id for the first (as for every single-package order), ``<order_id>.<position>`` after.
    Stable, so a retried grant or renewal never grants or renews twice."""
    return order_id if position == 0 else f"{order_id}.{position}"


@dataclass(frozen=True, kw_only=True)
class NewOrder:
    """An order to place: paid at once, PENDING until quota has granted or renewed.

    ``price_micros`` is what the order costs (non-negative); its payment is a ledger line whose
    signed ``amount`` is ``-price_micros``, its refund one of ``+price_micros``."""

    kind: OrderKind
    account_id: str
    paying_account_id: str
    offer_id: str
    region: str
    api: str
    enterprise_project_id: str
    quantity: int
    periods: int
    price_micros: int
    effective_time: datetime
    expire_time: datetime
    package_id: str = ""
    auto_renew: bool = False
    # The packages of the order, one at least (``package_count`` of them).
    packages: tuple[OrderPackage, ...] = ()

    @property
    def package_count(self) -> int:
        return max(len(self.packages), 1)

    @property
    def package_ids(self) -> tuple[str, ...]:
        """The ids known so far (a PENDING purchase has none)."""
        return tuple(p.package_id for p in self.packages if p.package_id)


@dataclass(frozen=True, kw_only=True)
class Order(NewOrder):
    """A placed order: what was bought (``NewOrder``) and where it stands."""

    order_id: str
    state: OrderState
    currency_code: str
    failure_reason: str
    create_time: datetime
    update_time: datetime


def order_not_found(order_id: str) -> NotFound:
    return NotFound("ORDER_NOT_FOUND", f"no order {order_id!r}", order_id=order_id)
