"""Billing's events, staged in the outbox in the transaction that causes them, and the wire
forms they share with the API (money, orders)."""

from __future__ import annotations

from datetime import datetime

from allot.billing.v1 import billing_pb2
from google.type import money_pb2

from services.billing.adapters.metrics import BillingMetrics
from shared.db import UnitOfWork
from shared.money import to_wire
from shared.outbox import Outbox
from shared.timeutil import to_timestamp


def micros_to_money(micros: int, currency: str) -> money_pb2.Money:
    # Integers only (a float division loses digits past 2^53 micros); units and nanos share
    # the amount's sign.
    units, nanos = to_wire(micros)
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def order_message(order) -> billing_pb2.Order:
    """The wire form of an order (domain.orders.Order; its amount is the price)."""
    return billing_pb2.Order(
        order_id=order.order_id,
        kind=int(order.kind),
        state=int(order.state),
        account_id=order.account_id,
        package_id=order.package_id,
        amount=micros_to_money(order.price_micros, order.currency_code),
        create_time=to_timestamp(order.create_time),
        offer_id=order.offer_id,
        region=order.region,
        api=order.api,
        enterprise_project_id=order.enterprise_project_id,
        quantity=order.quantity,
        periods=order.periods,
        effective_time=to_timestamp(order.effective_time),
        expire_time=to_timestamp(order.expire_time),
        update_time=to_timestamp(order.update_time),
        failure_reason=order.failure_reason,
        paying_account_id=order.paying_account_id,
        package_ids=list(order.package_ids),
        package_count=order.package_count,
    )


class BillingEvents:
    def __init__(
        self, outbox: Outbox[billing_pb2.BillingEvent], metrics: BillingMetrics | None = None
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics if metrics is not None else BillingMetrics()

    def standing_changed(
        self,
        uow: UnitOfWork,
        account_id: str,
        payer,
        previous: int,
        now: datetime,
        *,
        block_pay_per_use_in_grace: bool = False,
        master_account_id: str = "",
        monthly_spending_cap_micros: int = 0,
        spending: tuple[str, dict[str, int]] | None = None,
    ) -> None:
        """``account_id`` (the payer or one of its members) follows the payer's standing
        (``payer``: domain.accounts.Account after the change). The event carries the account's
        whole admission state (its pay-per-use block and master too), so quota's projection
        is the latest event's (docs/design/arrears.md)."""
        payload = billing_pb2.AccountStandingChanged(
            account_id=account_id,
            previous_standing=int(previous),
            standing=int(payer.standing),
            balance=micros_to_money(payer.balance_micros, payer.currency_code),
            block_pay_per_use_in_grace=block_pay_per_use_in_grace,
            master_account_id=master_account_id,
            monthly_spending_cap_micros=monthly_spending_cap_micros,
        )
        if spending is not None:  # (month, settled pay-per-use by region) of a capped account
            payload.spending_month = spending[0]
            payload.settled_pay_per_use_micros.update(spending[1])
        if payer.standing_change_time:
            # When the change came due (a clock-driven change is stamped with its due time).
            payload.change_time.CopyFrom(to_timestamp(payer.standing_change_time))
        if payer.grace_end_time:
            payload.grace_end_time.CopyFrom(to_timestamp(payer.grace_end_time))
        if payer.retention_end_time:
            payload.retention_end_time.CopyFrom(to_timestamp(payer.retention_end_time))
        self.outbox.add(uow, "account_standing_changed", payload, now, account_id=account_id)

    def balance_below_threshold(
        self,
        uow: UnitOfWork,
        account_id: str,
        balance: int,
        threshold: int,
        currency: str,
        now: datetime,
    ) -> None:
        payload = billing_pb2.BalanceBelowThreshold(
            account_id=account_id,
            balance=micros_to_money(balance, currency),
            threshold=micros_to_money(threshold, currency),
        )
        self.outbox.add(uow, "balance_below_threshold", payload, now, account_id=account_id)

    def order_updated(self, uow: UnitOfWork, order, previous: int | None, now: datetime) -> None:
        payload = billing_pb2.OrderUpdated(order=order_message(order))
        self.metrics.order_entered(uow, order.kind.name, order.state.name)
        if previous is not None:
            payload.previous_state = int(previous)
        self.outbox.add(
            uow, "order_updated", payload, now, account_id=order.account_id, region=order.region
        )

    def auto_renew_failed(self, uow: UnitOfWork, sold, reason: str, now: datetime) -> None:
        """``sold``: domain.packages.SoldPackage after the failed attempt (its next attempt)."""
        payload = billing_pb2.AutoRenewFailed(
            account_id=sold.account_id,
            package_id=sold.package_id,
            reason=reason,
            expire_time=to_timestamp(sold.expire_time),
            region=sold.region,
        )
        if sold.next_attempt_time is not None:
            payload.next_attempt_time.CopyFrom(to_timestamp(sold.next_attempt_time))
        self.outbox.add(
            uow, "auto_renew_failed", payload, now, account_id=sold.account_id, region=sold.region
        )

    def auto_replenish_failed(
        self,
        uow: UnitOfWork,
        setting,
        crossing,
        reason: str,
        month_purchases: int,
        now: datetime,
    ) -> None:
        """``setting``: domain.replenish.AutoReplenish; ``crossing``: its Crossing."""
        payload = billing_pb2.AutoReplenishFailed(
            account_id=setting.account_id,
            region=setting.region,
            api=setting.api,
            offer_id=setting.offer_id,
            reason=reason,
            crossing_event_id=crossing.event_id,
            remaining_quantity=crossing.remaining_quantity,
            month_purchases=month_purchases,
            max_per_month=setting.max_per_month,
        )
        self.outbox.add(
            uow,
            "auto_replenish_failed",
            payload,
            now,
            account_id=setting.account_id,
            region=setting.region,
        )
