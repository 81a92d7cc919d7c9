"""Orders: a package purchase or renewal, paid at once, PENDING until quota has granted or
renewed the package, then FULFILLED (or FAILED and refunded, or CANCELLED and refunded)."""

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
}


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
