"""What a notification says: one message per relevant source event, in plain words.

Each kind of source event (a usage alert fired, a package expiring or used up; billing's
standing, balance, order and auto-renewal events later) becomes one message type, a one-line
subject and a body that names the account, region, API and the numbers a reader needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo


class MessageType(enum.IntEnum):
    """allot.notification.v1.MessageType."""

    USAGE_ALERT = 1
    PACKAGE_EXPIRING = 2
    PACKAGE_EXHAUSTED = 3
    ARREARS = 4
    BALANCE_ALERT = 5
    ORDER = 6
    AUTO_RENEW_FAILED = 7
    TEST = 8
    AUTO_REPLENISH_FAILED = 9


class Channel(enum.IntEnum):
    """allot.notification.v1.Channel."""

    EMAIL = 1
    SMS = 2
    WEBHOOK = 3


@dataclass(frozen=True)
class UsageAlertFired:
    alert_id: str
    account_id: str
    region: str
    api: str
    remaining_quantity: int
    # The sum over the packages in force of the alert's scope (the event's `total_quantity`);
    # a single package's grant is its `total_quantity` (PackageExpiring, PackageExhausted).
    quantity_in_force: int
    threshold: str  # "5000 calls" or "20%"


@dataclass(frozen=True)
class ForecastAlertFired:
    """A usage alert on the forecast fired (docs/design/forecasts.md): `days` set for "used up
    within N days", `forfeiture_above` (with the package expected to forfeit most) for "more
    than N calls forfeited"."""

    alert_id: str
    account_id: str
    region: str
    api: str
    daily_rate: str  # calls a day, a decimal string
    remaining_quantity: int
    days: int | None = None
    depletion_time: datetime | None = None
    forfeiture_above: int | None = None
    package_id: str = ""
    forfeited_quantity: int = 0
    expire_time: datetime | None = None


@dataclass(frozen=True)
class PackageExpiring:
    package_id: str
    account_id: str
    region: str
    api: str
    remaining_quantity: int
    total_quantity: int
    expire_time: datetime
    days_left: int


@dataclass(frozen=True)
class PackageExhausted:
    package_id: str
    account_id: str
    region: str
    api: str
    total_quantity: int
    expire_time: datetime


@dataclass(frozen=True)
class StandingChanged:
    account_id: str
    previous: str  # "GOOD", "GRACE", "FROZEN", "RELEASED"
    standing: str
    balance: str  # "-12.50 USD"
    grace_end_time: datetime | None
    retention_end_time: datetime | None


@dataclass(frozen=True)
class BalanceBelowThreshold:
    account_id: str
    balance: str
    threshold: str


@dataclass(frozen=True)
class OrderChanged:
    order_id: str
    account_id: str
    state: str  # "PENDING", "FULFILLED", "FAILED", "CANCELLED"
    offer_id: str
    region: str
    api: str
    amount: str
    failure_reason: str


@dataclass(frozen=True)
class AutoRenewalFailed:
    account_id: str
    package_id: str
    region: str  # "" from a billing older than the field: then visible to every region
    reason: str
    next_attempt_time: datetime | None
    expire_time: datetime | None


@dataclass(frozen=True)
class AutoReplenishFailed:
    account_id: str
    region: str
    api: str
    offer_id: str
    reason: str
    remaining_quantity: int
    month_purchases: int
    max_per_month: int


SourceEvent = (
    UsageAlertFired
    | ForecastAlertFired
    | PackageExpiring
    | PackageExhausted
    | StandingChanged
    | BalanceBelowThreshold
    | OrderChanged
    | AutoRenewalFailed
    | AutoReplenishFailed
)

_STANDING_MEANS = {
    "GOOD": "Calls, purchases and subscriptions work normally.",
    "GRACE": "Calls still work, pay-per-use included; purchases are refused until the debt is "
    "paid.",
    "FROZEN": "Calls are refused, package-paid and pay-per-use alike, until the debt is paid.",
    "RELEASED": "The account's API subscriptions were cancelled.",
}


def _when(value: datetime | None) -> str:
    """An instant for a webhook's data: ISO 8601 as the event carried it (UTC)."""
    return value.isoformat() if value is not None else "-"


def _local(value: datetime | None, tz: tzinfo) -> str:
    """An instant for a person: on the billing time zone's clock, with its offset."""
    return value.astimezone(tz).isoformat(sep=" ") if value is not None else "-"


@dataclass(frozen=True)
class Message:
    message_type: MessageType
    account_id: str
    subject: str
    body: str
    data: dict = field(default_factory=dict)  # structured fields for webhooks

    @property
    def region(self) -> str:
        """The region the message is about; "" for account-wide ones."""
        region = self.data.get("region", "")
        return region if isinstance(region, str) else ""


def _billing_message(event: SourceEvent, tz: tzinfo) -> Message | None:
    if isinstance(event, StandingChanged):
        deadlines = ""
        if event.standing == "GRACE":
            deadlines = (
                f" Top up by {_local(event.grace_end_time, tz)} to avoid a freeze; the account "
                f"is released at {_local(event.retention_end_time, tz)}."
            )
        elif event.standing == "FROZEN":
            deadlines = f" It is released at {_local(event.retention_end_time, tz)}."
        return Message(
            MessageType.ARREARS,
            event.account_id,
            f"Account {event.account_id} is now {event.standing.lower()}",
            f"Account {event.account_id} changed from {event.previous} to {event.standing} "
            f"(balance {event.balance}). {_STANDING_MEANS.get(event.standing, '')}{deadlines}",
            {
                "previous_standing": event.previous,
                "standing": event.standing,
                "balance": event.balance,
                "grace_end_time": _when(event.grace_end_time),
                "retention_end_time": _when(event.retention_end_time),
            },
        )
    if isinstance(event, BalanceBelowThreshold):
        return Message(
            MessageType.BALANCE_ALERT,
            event.account_id,
            f"Balance below {event.threshold}",
            f"Account {event.account_id}: the balance is {event.balance}, below your alert "
            f"threshold of {event.threshold}.",
            {"balance": event.balance, "threshold": event.threshold},
        )
    if isinstance(event, OrderChanged):
        reason = f" Reason: {event.failure_reason}." if event.failure_reason else ""
        return Message(
            MessageType.ORDER,
            event.account_id,
            f"Order {event.order_id} {event.state.lower()}",
            f"Account {event.account_id}: order {event.order_id} ({event.offer_id}, {event.api} "
            f"in {event.region}, {event.amount}) is {event.state}.{reason}",
            {
                "order_id": event.order_id,
                "state": event.state,
                "offer_id": event.offer_id,
                "region": event.region,
                "api": event.api,
                "amount": event.amount,
            },
        )
    if isinstance(event, AutoRenewalFailed):
        return Message(
            MessageType.AUTO_RENEW_FAILED,
            event.account_id,
            f"Auto-renewal of package {event.package_id} failed",
            f"Account {event.account_id}: renewing package {event.package_id}"
            f"{f' in {event.region}' if event.region else ''} failed "
            f"({event.reason}). Next attempt {_local(event.next_attempt_time, tz)}; the package "
            f"expires at {_local(event.expire_time, tz)}.",
            {
                "package_id": event.package_id,
                "region": event.region,
                "reason": event.reason,
                "next_attempt_time": _when(event.next_attempt_time),
                "expire_time": _when(event.expire_time),
            },
        )
    if isinstance(event, AutoReplenishFailed):
        return Message(
            MessageType.AUTO_REPLENISH_FAILED,
            event.account_id,
            f"Auto-replenish of {event.api} in {event.region} bought nothing",
            f"Account {event.account_id}: {_calls(event.remaining_quantity)} of {event.api} "
            f"are left in {event.region}, but auto-replenish could not buy {event.offer_id} "
            f"({event.reason}; {event.month_purchases} of {event.max_per_month} purchases "
            "made this month).",
            {
                "region": event.region,
                "api": event.api,
                "offer_id": event.offer_id,
                "reason": event.reason,
                "remaining_quantity": event.remaining_quantity,
                "month_purchases": event.month_purchases,
                "max_per_month": event.max_per_month,
            },
        )
    return None


def _calls(n: int) -> str:
    return f"{n:,} call" + ("" if n == 1 else "s")


def compose(event: SourceEvent, tz: tzinfo = UTC) -> Message:
    """The message of a source event; times in the text are on ``tz``'s clock (the billing
    time zone), times in the data stay as the event carried them."""
    billing = _billing_message(event, tz)
    if billing is not None:
        return billing
    if isinstance(event, UsageAlertFired):
        return Message(
            MessageType.USAGE_ALERT,
            event.account_id,
            f"Usage alert: {_calls(event.remaining_quantity)} of {event.api} left "
            f"in {event.region}",
            f"Account {event.account_id}: the packages of {event.api} in {event.region} have "
            f"{_calls(event.remaining_quantity)} left of {event.quantity_in_force:,}, which "
            f"reached your alert threshold of {event.threshold} (alert {event.alert_id}).\n"
            "Calls beyond your packages are charged pay-per-use.",
            {
                "alert_id": event.alert_id,
                "region": event.region,
                "api": event.api,
                "remaining_quantity": event.remaining_quantity,
                # The webhook data keeps the wire's name (a public payload contract).
                "total_quantity": event.quantity_in_force,
                "threshold": event.threshold,
            },
        )
    if isinstance(event, ForecastAlertFired):
        return _forecast_message(event, tz)
    if isinstance(event, PackageExpiring):
        return Message(
            MessageType.PACKAGE_EXPIRING,
            event.account_id,
            f"Package expires in {event.days_left} day{'s' if event.days_left != 1 else ''}: "
            f"{event.api} in {event.region}",
            f"Account {event.account_id}: package {event.package_id} ({event.api}, "
            f"{event.region}) expires at {_local(event.expire_time, tz)} with "
            f"{_calls(event.remaining_quantity)} of {event.total_quantity:,} left. "
            "What is left then is forfeited; renew it to keep it.",
            {
                "package_id": event.package_id,
                "region": event.region,
                "api": event.api,
                "remaining_quantity": event.remaining_quantity,
                "total_quantity": event.total_quantity,
                "expire_time": event.expire_time.isoformat(),
                "days_left": event.days_left,
            },
        )
    return Message(
        MessageType.PACKAGE_EXHAUSTED,
        event.account_id,
        f"Package used up: {event.api} in {event.region}",
        f"Account {event.account_id}: package {event.package_id} ({event.api}, {event.region}) "
        f"has used all {_calls(event.total_quantity)}. Further calls use your other packages "
        "or are charged pay-per-use.",
        {
            "package_id": event.package_id,
            "region": event.region,
            "api": event.api,
            "total_quantity": event.total_quantity,
            "expire_time": event.expire_time.isoformat(),
        },
    )


def _forecast_message(event: ForecastAlertFired, tz: tzinfo) -> Message:
    data = {
        "alert_id": event.alert_id,
        "region": event.region,
        "api": event.api,
        "daily_rate": event.daily_rate,
        "remaining_quantity": event.remaining_quantity,
    }
    rate = f"at the recent rate of {event.daily_rate} calls a day"
    if event.days is not None:
        around = (
            f" (around {event.depletion_time.astimezone(tz).date().isoformat()})"
            if event.depletion_time is not None
            else ""
        )
        within = f"{event.days} day{'s' if event.days != 1 else ''}"
        return Message(
            MessageType.USAGE_ALERT,
            event.account_id,
            f"Usage alert: {event.api} in {event.region} will be used up within {within}",
            f"Account {event.account_id}: {rate}, the packages of "
            f"{event.api} in {event.region} ({_calls(event.remaining_quantity)} left) will be "
            f"used up within {within}{around} (alert {event.alert_id}).\n"
            "Calls beyond your packages are charged pay-per-use; buy a package to keep them "
            "covered.",
            data
            | {"depletion_within_days": event.days, "depletion_time": _when(event.depletion_time)},
        )
    at = _local(event.expire_time, tz)
    return Message(
        MessageType.USAGE_ALERT,
        event.account_id,
        f"Usage alert: {_calls(event.forfeited_quantity)} of {event.api} in {event.region} "
        "will be forfeited",
        f"Account {event.account_id}: {rate}, "
        f"{_calls(event.forfeited_quantity)} will be forfeited at {at}, when package "
        f"{event.package_id} ({event.api}, {event.region}) expires; your alert threshold is "
        f"{_calls(event.forfeiture_above or 0)} (alert {event.alert_id}).",
        data
        | {
            "forfeiture_above_quantity": event.forfeiture_above,
            "package_id": event.package_id,
            "forfeited_quantity": event.forfeited_quantity,
            "expire_time": _when(event.expire_time),
        },
    )


def sample_message(account_id: str, contact_id: str) -> Message:
    return Message(
        MessageType.TEST,
        account_id,
        "Allot test notification",
        f"This is a test notification for account {account_id} sent to contact {contact_id}. "
        "If you received it, the contact works.",
        {"contact_id": contact_id},
    )
