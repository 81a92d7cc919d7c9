"""Auto-replenish: buy an offer when the remaining quantity of an account's packages in force
(one region and API) falls to a threshold, once per crossing, at most ``max_per_month`` times
per calendar month of the billing time zone (docs/design/auto-replenish.md).

Pure rules: the setting, its checks, and what one crossing does. Where the crossing comes from
(quota's usage alert rule and its ``threshold_crossed`` event) and how the order is placed are
the use case's (``app/replenish.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, tzinfo

from services.billing.domain.cycles import month_bounds, month_key
from shared.errors import InvalidArgument

# The largest threshold (calls); quota's alert rules take the same bound.
MAX_BELOW_QUANTITY = 10**15
# The most purchases a setting may make per month.
MAX_PER_MONTH = 100

# Reasons of ``auto_replenish_failed`` beyond the order's own (INSUFFICIENT_BALANCE,
# ACCOUNT_IN_ARREARS).
LIMIT_REACHED = "AUTO_REPLENISH_LIMIT_REACHED"
OFFER_GONE = "UNKNOWN_OFFER"
# The owner quota records on a setting's rule (UsageAlert.owner): the rule is the system's,
# not one of the customer's alerts (docs/design/auto-replenish.md, "The rule is billing's").
RULE_OWNER = "auto_replenish"


@dataclass(frozen=True)
class AutoReplenish:
    """The setting of one account, region and API. ``alert_id`` is quota's usage alert rule
    billing keeps for it. ``rearm_time`` is when the rule is to be switched on and re-armed in
    quota (at once after SetAutoReplenish; the next month's start once this month's limit was
    reached), None when nothing is to be done; ``rearm_request_id`` the request id quota is
    asked with for it, unique per re-arm."""

    account_id: str
    region: str
    api: str
    offer_id: str
    below_quantity: int
    max_per_month: int
    enabled: bool
    alert_id: str
    last_failure_reason: str
    rearm_time: datetime | None
    create_time: datetime
    update_time: datetime
    rearm_request_id: str = ""


@dataclass(frozen=True)
class Crossing:
    """Quota's ``threshold_crossed`` event as auto-replenish reads it. ``time`` is when quota
    announced it: the crossing counts towards that month (billing time zone), whenever billing
    takes it."""

    event_id: str
    alert_id: str
    account_id: str
    region: str
    api: str
    remaining_quantity: int
    time: datetime | None = None


class Outcome(enum.Enum):
    IGNORE = 1  # not this setting's crossing, or the setting does not buy now
    BUY = 2
    LIMIT_REACHED = 3


def check_below_quantity(value: int) -> int:
    if not 0 <= value <= MAX_BELOW_QUANTITY:
        raise InvalidArgument(
            "below_quantity", f"below_quantity must be between 0 and {MAX_BELOW_QUANTITY}"
        )
    return value


def check_max_per_month(value: int) -> int:
    if not 1 <= value <= MAX_PER_MONTH:
        raise InvalidArgument(
            "max_per_month", f"max_per_month must be between 1 and {MAX_PER_MONTH}"
        )
    return value


def check_lifts(offer_quantity: int, below_quantity: int) -> None:
    """One purchase must lift the remaining quantity above the threshold: otherwise the grant
    (which re-arms the rule) would find it still at or below and buy again at once."""
    if offer_quantity <= below_quantity:
        raise InvalidArgument(
            "below_quantity",
            f"below_quantity must be less than the offer's quantity ({offer_quantity})",
        )


def decide(setting: AutoReplenish | None, crossing: Crossing, month_purchases: int) -> Outcome:
    """What a crossing does. Only the crossing of the setting's own rule counts, only while the
    setting is enabled and the remaining quantity is at or below its threshold (a rule edited
    in quota behind billing's back buys nothing more than the setting says)."""
    if setting is None or not setting.enabled or setting.alert_id != crossing.alert_id:
        return Outcome.IGNORE
    if (setting.account_id, setting.region, setting.api) != (
        crossing.account_id,
        crossing.region,
        crossing.api,
    ):
        return Outcome.IGNORE
    if crossing.remaining_quantity > setting.below_quantity:
        return Outcome.IGNORE
    if month_purchases >= setting.max_per_month:
        return Outcome.LIMIT_REACHED
    return Outcome.BUY


def next_month_start(now: datetime, tz: tzinfo) -> datetime:
    """The first instant of the month after ``now``'s (billing time zone), in UTC."""
    return month_bounds(month_key(now, tz), tz)[1]
