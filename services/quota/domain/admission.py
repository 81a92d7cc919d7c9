"""Admission: may a call proceed now? A decision returned as data, never an error."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta


class Standing(enum.IntEnum):
    """Quota's projection of billing's account standing (absent = GOOD)."""

    GOOD = 1
    GRACE = 2
    FROZEN = 3
    RELEASED = 4


@dataclass(frozen=True)
class StandingChange:
    """A change of an account's standing as billing announced it.

    `sequence` and `event_id` are those of billing's event: the sequence is billing's commit
    order, so the change with the greatest sequence is billing's current standing.
    `change_time` is when billing says the standing changed (None when its event does not say).
    Each event carries the account's whole admission state: the standing, whether pay-per-use
    is blocked in grace, and the enterprise master ('' for none).
    """

    account_id: str
    standing: Standing
    change_time: datetime | None
    sequence: int
    event_id: str
    block_pay_per_use_in_grace: bool = False
    master_account_id: str = ""
    # The account's own monthly pay-per-use cap in micros, 0 = none
    # (docs/design/spending-cap.md).
    monthly_spending_cap_micros: int = 0
    # With a cap: the month ("YYYY-MM", billing time zone) and the account's settled
    # pay-per-use charges of it by region, as billing announced them.
    spending_month: str = ""
    settled_by_region: tuple[tuple[str, int], ...] = ()


class DenyReason(enum.IntEnum):
    NONE = 0
    API_NOT_SUBSCRIBED = 1
    ACCOUNT_FROZEN = 2
    ACCOUNT_RELEASED = 3
    PAY_PER_USE_BLOCKED = 4
    RATE_LIMITED = 5
    SPENDING_CAP = 6


@dataclass(frozen=True)
class Admission:
    allowed: bool
    deny_reason: DenyReason
    remaining_quantity: int
    pay_per_use: bool
    # With RATE_LIMITED only: when the rate limit admits a call again (domain/rate_limits.py).
    retry_after: timedelta | None = None


def admit(
    *,
    subscribed: bool,
    standing: Standing,
    remaining_quantity: int,
    quantity: int,
    block_pay_per_use_in_grace: bool = False,
    spending_cap_micros: int = 0,
    month_spend_micros: int = 0,
) -> Admission:
    """The API must be subscribed and the account neither frozen nor released; in grace, calls
    that packages do not cover are refused only when the account's setting (billing's
    `block_pay_per_use_in_grace`, its own or its master's) blocks pay-per-use there. Calls
    packages do not cover are refused too once the month's pay-per-use (`month_spend_micros`,
    what quota counted: docs/design/spending-cap.md) reached the account's cap (0 = none)."""
    pay_per_use = remaining_quantity < quantity
    reason = DenyReason.NONE
    if not subscribed:
        reason = DenyReason.API_NOT_SUBSCRIBED
    elif standing == Standing.FROZEN:
        reason = DenyReason.ACCOUNT_FROZEN
    elif standing == Standing.RELEASED:
        reason = DenyReason.ACCOUNT_RELEASED
    elif standing == Standing.GRACE and pay_per_use and block_pay_per_use_in_grace:
        reason = DenyReason.PAY_PER_USE_BLOCKED
    elif pay_per_use and spending_cap_micros > 0 and month_spend_micros >= spending_cap_micros:
        reason = DenyReason.SPENDING_CAP
    return Admission(reason == DenyReason.NONE, reason, remaining_quantity, pay_per_use)
