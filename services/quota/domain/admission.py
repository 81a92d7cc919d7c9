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


class DenyReason(enum.IntEnum):
    NONE = 0
    API_NOT_SUBSCRIBED = 1
    ACCOUNT_FROZEN = 2
    ACCOUNT_RELEASED = 3
    PAY_PER_USE_BLOCKED = 4
    RATE_LIMITED = 5


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
) -> Admission:
    """The API must be subscribed and the account neither frozen nor released; in grace, calls
    that packages do not cover are refused only when the account's setting (billing's
    `block_pay_per_use_in_grace`, its own or its master's) blocks pay-per-use there."""
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
    return Admission(reason == DenyReason.NONE, reason, remaining_quantity, pay_per_use)
