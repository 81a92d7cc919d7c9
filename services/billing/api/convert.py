"""Protobuf <-> billing use-case types. Money crosses as google.type.Money and lives inside as
integer micro-units."""

from __future__ import annotations

from datetime import date, timedelta, tzinfo
from decimal import Decimal

from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2
from google.type import date_pb2, money_pb2

from services.billing.adapters.events import micros_to_money
from services.billing.app.accounts import AccountInput, AccountSettings
from services.billing.app.bills import ShownBill
from services.billing.app.replenish import ReplenishView
from services.billing.domain.accounts import Account
from services.billing.domain.bills import BillLine
from services.billing.domain.cycles import month_bounds
from services.billing.domain.line_explanations import LineEvent
from services.billing.domain.overview import AccountOverview
from services.billing.domain.packages import SoldPackage
from services.billing.domain.subscriptions import Subscription
from shared.catalog import Offer, PriceTier
from shared.errors import InvalidArgument
from shared.money import from_wire, to_micros
from shared.timeutil import from_duration, to_timestamp


def money_to_micros(money: money_pb2.Money, field: str) -> int:
    """Exact micro-units within shared.money's bounds, else INVALID_ARGUMENT naming ``field``."""
    return from_wire(money.units, money.nanos, field)


def from_proto_date(value: date_pb2.Date, field: str) -> date:
    """A whole calendar date (year, month and day all set), else INVALID_ARGUMENT naming
    ``field``."""
    try:
        return date(value.year, value.month, value.day)
    except ValueError:
        raise InvalidArgument(
            field, f"{field} must be a whole calendar date (year, month and day)"
        ) from None


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


def from_proto_update(request) -> AccountSettings:
    return AccountSettings(
        account_id=request.account.account_id,
        display_name=request.account.display_name,
        block_pay_per_use_in_grace=request.account.block_pay_per_use_in_grace,
        paths=tuple(request.update_mask.paths),
    )


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
        block_pay_per_use_in_grace=account.block_pay_per_use_in_grace,
    )
    if account.monthly_spending_cap_micros:
        message.monthly_spending_cap.CopyFrom(
            micros_to_money(account.monthly_spending_cap_micros, account.currency_code)
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


def to_proto_auto_renewal(sold: SoldPackage) -> billing_pb2.AutoRenewal:
    """The wire form of a sold package's auto-renewal setting and schedule."""
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


def to_proto_auto_replenish(view: ReplenishView) -> billing_pb2.AutoReplenish:
    """The wire form of an auto-replenish setting and this month's purchases."""
    setting = view.setting
    return billing_pb2.AutoReplenish(
        account_id=setting.account_id,
        region=setting.region,
        api=setting.api,
        offer_id=setting.offer_id,
        below_quantity=setting.below_quantity,
        max_per_month=setting.max_per_month,
        enabled=setting.enabled,
        month_purchases=view.month_purchases,
        alert_id=setting.alert_id,
        last_failure_reason=setting.last_failure_reason,
        create_time=to_timestamp(setting.create_time),
        update_time=to_timestamp(setting.update_time),
    )


def to_proto_subscription(subscription: Subscription) -> billing_pb2.ApiSubscription:
    """The wire form of billing's record of a subscription."""
    return billing_pb2.ApiSubscription(
        account_id=subscription.account_id,
        region=subscription.region,
        api=subscription.api,
        # RELEASING (quota not told yet) is already cancelled for the customer.
        state=min(subscription.state, 2),
        create_time=to_timestamp(subscription.create_time),
        update_time=to_timestamp(subscription.update_time),
    )


def to_proto_line(line: BillLine, currency: str) -> billing_pb2.BillLine:
    """A bill line; its ``amount`` is signed by its effect on the paying balance, a tier's
    ``amount`` is that tier's (non-negative, exact) price."""
    message = billing_pb2.BillLine(
        kind=int(line.kind),
        account_id=line.account_id,
        region=line.region,
        api=line.api,
        enterprise_project_id=line.enterprise_project_id,
        quantity=line.quantity,
        free_quantity=line.free_quantity,
        amount=micros_to_money(line.amount_micros, currency),
        order_id=line.order_id,
        description=line.description,
        occur_time=to_timestamp(line.occur_time),
        tiers=[
            billing_pb2.BillLineTier(
                tier=charge.tier,
                quantity=charge.quantity,
                unit_price=micros_to_money(to_micros(charge.unit_price), currency),
                amount=micros_to_money(charge.price_micros, currency),
            )
            for charge in line.tiers
        ],
    )
    if line.cycle_start is not None:
        message.cycle_start_time.CopyFrom(to_timestamp(line.cycle_start))
    if line.cycle_end is not None:
        message.cycle_end_time.CopyFrom(to_timestamp(line.cycle_end))
    return message


def to_proto_bill(shown: ShownBill, tz: tzinfo) -> billing_pb2.Bill:
    """The wire form of a bill as its caller may see it."""
    bill = shown.bill
    start, end = month_bounds(bill.month, tz)
    currency = bill.currency
    message = billing_pb2.Bill(
        account_id=bill.account_id,
        month=bill.month,
        currency_code=currency,
        lines=[to_proto_line(line, currency) for line in shown.lines],
        # The lines' amounts are their effects on the paying balance: their sum.
        total=micros_to_money(sum(line.amount_micros for line in shown.lines), currency),
        start_time=to_timestamp(start),
        end_time=to_timestamp(end),
    )
    message.project_subtotals.extend(
        billing_pb2.BillProjectSubtotal(
            enterprise_project_id=project, total=micros_to_money(amount, currency)
        )
        for project, amount in shown.project_subtotals
    )
    message.member_subtotals.extend(
        billing_pb2.BillMemberSubtotal(account_id=account, total=micros_to_money(amount, currency))
        for account, amount in shown.member_subtotals
    )
    if shown.shows_balances:
        message.opening_balance.CopyFrom(micros_to_money(bill.opening_balance_micros, currency))
        message.closing_balance.CopyFrom(micros_to_money(bill.closing_balance_micros, currency))
    return message


def to_proto_overview(seen: AccountOverview) -> billing_service_pb2.AccountOverview:
    currency = seen.account.currency_code
    regions = []
    for region in seen.regions:
        apis = []
        for figures in region.apis:
            api = billing_service_pb2.ApiOverview(
                api=figures.api,
                packages_in_force=figures.packages_in_force,
                remaining_quantity=figures.remaining_quantity,
                total_quantity=figures.total_quantity,
                pay_per_use_quantity_month=figures.pay_per_use_quantity_month,
                pay_per_use_amount_month=micros_to_money(
                    figures.pay_per_use_charge_month, currency
                ),
            )
            if figures.next_expire_time is not None:
                api.next_expire_time.CopyFrom(to_timestamp(figures.next_expire_time))
            apis.append(api)
        regions.append(
            billing_service_pb2.RegionOverview(
                region=region.region, available=region.available, apis=apis
            )
        )
    return billing_service_pb2.AccountOverview(
        account=to_proto_account(seen.account),
        regions=regions,
        # Quota's own messages, as quota listed them.
        unheard_alerts=[alert.wire for alert in seen.unheard_alerts],
        notification_available=seen.notification_available,
    )


def to_proto_line_event(event: LineEvent) -> billing_service_pb2.BillLineEvent:
    usage = event.usage
    out = billing_service_pb2.BillLineEvent(
        usage_event_id=usage.usage_event_id,
        enterprise_project_id=usage.enterprise_project_id,
        pay_per_use_quantity=usage.quantity,
        occur_time=to_timestamp(usage.occur_time),
        near_misses=[
            quota_pb2.NearMiss(
                package_id=m.package_id,
                region=m.region,
                api=m.api,
                enterprise_project_id=m.enterprise_project_id,
                reason=m.reason,
            )
            for m in event.near_misses
        ],
        unavailable=event.unavailable,
    )
    if isinstance(event.explanation, quota_pb2.UsageExplanation):
        out.explanation.CopyFrom(event.explanation)
    return out
