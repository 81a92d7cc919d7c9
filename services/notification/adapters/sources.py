"""Source events of other services' streams, as notification's domain events.

Only the events a person should hear about become messages: quota's `threshold_crossed` (of
the customer's own rules: a crossing of a rule the system owns, such as an auto-replenish
setting's, is for its owner; docs/design/usage-alerts.md, "Owned rules"), `package_expiring`,
and `package_state_changed` into EXHAUSTED; billing's standing changes, balance alerts, order
changes, failed auto-renewals and auto-replenish purchases that bought nothing. Everything
else is None.
"""

from __future__ import annotations

from allot.quota.v1 import quota_pb2

from services.notification.domain.messages import (
    AutoRenewalFailed,
    AutoReplenishFailed,
    BalanceBelowThreshold,
    ForecastAlertFired,
    OrderChanged,
    PackageExhausted,
    PackageExpiring,
    SourceEvent,
    StandingChanged,
    UsageAlertFired,
)
from shared.money import format_amount
from shared.timeutil import EPOCH, from_timestamp

QUOTA_EVENT_TYPES = ("threshold_crossed", "package_expiring", "package_state_changed")


def _threshold(payload: quota_pb2.ThresholdCrossed) -> str:
    if payload.WhichOneof("threshold") == "threshold_percent":
        return f"{payload.threshold_percent:g}%"
    return f"{payload.threshold_quantity:,} calls"


_FORECAST_THRESHOLDS = ("threshold_depletion_days", "threshold_forfeiture_quantity")


def _forecast_alert(p: quota_pb2.ThresholdCrossed) -> ForecastAlertFired:
    def when(message, name: str):
        return from_timestamp(getattr(message, name), name) if message.HasField(name) else None

    common = {
        "alert_id": p.alert_id,
        "account_id": p.account_id,
        "region": p.region,
        "api": p.api,
        "daily_rate": p.daily_rate or "0",
        "remaining_quantity": p.remaining_quantity,
    }
    if p.WhichOneof("threshold") == "threshold_depletion_days":
        return ForecastAlertFired(
            **common, days=p.threshold_depletion_days, depletion_time=when(p, "depletion_time")
        )
    return ForecastAlertFired(
        **common,
        forfeiture_above=p.threshold_forfeiture_quantity,
        package_id=p.forfeiture.package_id,
        forfeited_quantity=p.forfeiture.quantity,
        expire_time=when(p.forfeiture, "expire_time"),
    )


def from_quota_event(event: quota_pb2.QuotaEvent) -> SourceEvent | None:
    kind = event.WhichOneof("payload")
    if kind == "threshold_crossed":
        p = event.threshold_crossed
        if p.owner:
            return None  # the system's own rule: its owner acts on it, nobody is told
        if p.WhichOneof("threshold") in _FORECAST_THRESHOLDS:
            return _forecast_alert(p)
        return UsageAlertFired(
            alert_id=p.alert_id,
            account_id=p.account_id,
            region=p.region,
            api=p.api,
            remaining_quantity=p.remaining_quantity,
            # The wire's total_quantity of an alert is the sum over the packages in force.
            quantity_in_force=p.total_quantity,
            threshold=_threshold(p),
        )
    if kind == "package_expiring":
        pkg = event.package_expiring.package
        return PackageExpiring(
            package_id=pkg.package_id,
            account_id=pkg.account_id,
            region=pkg.region,
            api=pkg.api,
            remaining_quantity=pkg.remaining_quantity,
            total_quantity=pkg.total_quantity,
            expire_time=from_timestamp(pkg.expire_time, "expire_time"),
            days_left=event.package_expiring.days_left,
        )
    if kind == "package_state_changed":
        pkg = event.package_state_changed.package
        if pkg.state != quota_pb2.PACKAGE_STATE_EXHAUSTED:
            return None
        return PackageExhausted(
            package_id=pkg.package_id,
            account_id=pkg.account_id,
            region=pkg.region,
            api=pkg.api,
            total_quantity=pkg.total_quantity,
            expire_time=from_timestamp(pkg.expire_time, "expire_time")
            if pkg.HasField("expire_time")
            else EPOCH,
        )
    return None


BILLING_EVENT_TYPES = (
    "account_standing_changed",
    "balance_below_threshold",
    "order_updated",
    "auto_renew_failed",
    "auto_replenish_failed",
)


def _money(money) -> str:
    """google.type.Money as text with the currency's minor digits: "-12.50 USD"."""
    micros = money.units * 1_000_000 + money.nanos // 1000
    return f"{format_amount(micros, money.currency_code)} {money.currency_code}".rstrip()


def _optional_time(message, name: str):
    return from_timestamp(getattr(message, name), name) if message.HasField(name) else None


def from_billing_event(event) -> SourceEvent | None:
    """Billing's events as domain events (standing, balance, orders, auto-renewal,
    auto-replenish)."""
    from allot.billing.v1 import billing_pb2

    kind = event.WhichOneof("payload")
    standing = billing_pb2.AccountStanding.Name
    if kind == "account_standing_changed":
        p = event.account_standing_changed
        if p.previous_standing == p.standing:
            return None  # only a setting quota needs changed: nothing to tell the customer
        return StandingChanged(
            account_id=p.account_id,
            previous=standing(p.previous_standing).removeprefix("ACCOUNT_STANDING_"),
            standing=standing(p.standing).removeprefix("ACCOUNT_STANDING_"),
            balance=_money(p.balance),
            grace_end_time=_optional_time(p, "grace_end_time"),
            retention_end_time=_optional_time(p, "retention_end_time"),
        )
    if kind == "balance_below_threshold":
        p = event.balance_below_threshold
        return BalanceBelowThreshold(
            account_id=p.account_id, balance=_money(p.balance), threshold=_money(p.threshold)
        )
    if kind == "order_updated":
        o = event.order_updated.order
        return OrderChanged(
            order_id=o.order_id,
            account_id=o.account_id,
            state=billing_pb2.OrderState.Name(o.state).removeprefix("ORDER_STATE_"),
            offer_id=o.offer_id,
            region=o.region,
            api=o.api,
            amount=_money(o.amount),
            failure_reason=o.failure_reason,
        )
    if kind == "auto_renew_failed":
        p = event.auto_renew_failed
        return AutoRenewalFailed(
            account_id=p.account_id,
            package_id=p.package_id,
            region=p.region,
            reason=p.reason,
            next_attempt_time=_optional_time(p, "next_attempt_time"),
            expire_time=_optional_time(p, "expire_time"),
        )
    if kind == "auto_replenish_failed":
        p = event.auto_replenish_failed
        return AutoReplenishFailed(
            account_id=p.account_id,
            region=p.region,
            api=p.api,
            offer_id=p.offer_id,
            reason=p.reason,
            remaining_quantity=p.remaining_quantity,
            month_purchases=p.month_purchases,
            max_per_month=p.max_per_month,
        )
    return None
