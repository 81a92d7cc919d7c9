"""Protobuf <-> billing use-case types. Money crosses as google.type.Money and lives inside as
integer micro-units."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from allot.billing.v1 import billing_pb2
from google.type import money_pb2

from services.billing.adapters.events import micros_to_money
from services.billing.app.accounts import Account, AccountInput
from shared.catalog import Offer, PriceTier
from shared.money import from_wire
from shared.timeutil import from_duration, to_timestamp


def money_to_micros(money: money_pb2.Money, field: str) -> int:
    """Exact micro-units within shared.money's bounds, else INVALID_ARGUMENT naming ``field``."""
    return from_wire(money.units, money.nanos, field)


def decimal_to_money(amount: Decimal, currency: str) -> money_pb2.Money:
    return micros_to_money(int(amount * 1_000_000), currency)


def from_proto_account(account: billing_pb2.Account) -> AccountInput:
    return AccountInput(
        account_id=account.account_id,
        display_name=account.display_name,
        kind=account.kind,
        master_account_id=account.master_account_id,
        currency_code=account.currency_code,
        grace_period=from_duration(account.grace_period, "account.grace_period")
        if account.HasField("grace_period")
        else None,
        retention_period=from_duration(account.retention_period, "account.retention_period")
        if account.HasField("retention_period")
        else None,
    )


def _duration(value: timedelta):
    from google.protobuf import duration_pb2

    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def to_proto_account(account: Account) -> billing_pb2.Account:
    message = billing_pb2.Account(
        account_id=account.account_id,
        display_name=account.display_name,
        kind=int(account.kind),
        master_account_id=account.master_account_id,
        currency_code=account.currency_code,
        standing=int(account.standing),
        balance=micros_to_money(account.balance_micros, account.currency_code),
        grace_period=_duration(account.grace_period),
        retention_period=_duration(account.retention_period),
        create_time=to_timestamp(account.create_time),
        update_time=to_timestamp(account.update_time),
    )
    if account.balance_alert_micros is not None:
        message.balance_alert_threshold.CopyFrom(
            micros_to_money(account.balance_alert_micros, account.currency_code)
        )
    for name in ("standing_change_time", "grace_end_time", "retention_end_time"):
        value = getattr(account, name)
        if value is not None:
            getattr(message, name).CopyFrom(to_timestamp(value))
    return message


def to_proto_offer(offer: Offer, currency: str) -> billing_pb2.Offer:
    return billing_pb2.Offer(
        offer_id=offer.id,
        api=offer.api,
        regions=list(offer.regions),
        quantity=offer.quantity,
        validity_months=offer.validity_months,
        price=decimal_to_money(offer.price, currency),
    )


def to_proto_tier(tier: PriceTier, currency: str) -> billing_pb2.PriceTier:
    return billing_pb2.PriceTier(
        up_to_quantity=tier.up_to or 0, unit_price=decimal_to_money(tier.unit_price, currency)
    )


def to_proto_auto_renewal(sold) -> billing_pb2.AutoRenewal:
    """The wire form of app.packages.SoldPackage's auto-renewal setting and schedule."""
    message = billing_pb2.AutoRenewal(
        package_id=sold.package_id,
        account_id=sold.account_id,
        enabled=sold.auto_renew,
        lead_days=sold.lead_days,
        last_failure_reason=sold.last_failure_reason,
    )
    if sold.next_attempt_time is not None:
        message.next_attempt_time.CopyFrom(to_timestamp(sold.next_attempt_time))
    return message


def to_proto_subscription(subscription) -> billing_pb2.ApiSubscription:
    """The wire form of app.subscriptions.Subscription."""
    return billing_pb2.ApiSubscription(
        account_id=subscription.account_id,
        region=subscription.region,
        api=subscription.api,
        # RELEASING (quota not told yet) is already cancelled for the customer.
        state=min(subscription.state, 2),
        create_time=to_timestamp(subscription.create_time),
        update_time=to_timestamp(subscription.update_time),
    )
