"""Billing's record of the API subscriptions it asked quota for."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class SubscriptionState(enum.IntEnum):
    """``api_subscriptions.state``: the first two are ``ApiSubscriptionState`` of the protos."""

    ACTIVE = 1
    CANCELLED = 2
    # Cancelled by the release of the account; quota's DisableApi not confirmed yet. On the wire
    # this is CANCELLED.
    RELEASING = 3


@dataclass(frozen=True)
class Subscription:
    account_id: str
    region: str
    api: str
    state: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class PendingRelease:
    """A subscription marked RELEASING at ``marked_us`` (epoch microseconds), quota not told."""

    account_id: str
    region: str
    api: str
    marked_us: int
