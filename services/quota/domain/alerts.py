"""Usage alerts: edge-triggered thresholds on the aggregate remaining quantity.

A rule watches the packages in force (ACTIVE or EXHAUSTED) of one account, region and API
(an empty API means every API of the region, each with its own state). Its threshold is an
absolute remaining quantity or a percentage of the quantity in force (the sum of the grants
of the packages in force). It fires once when remaining reaches the threshold (at or below);
while it stays there nothing more is sent. Whenever the quantity in force changes (a package
granted, renewed, activated, expired or revoked) and when the rule is created or edited, the
rule is re-armed and evaluated at once: at or below the threshold it fires again right away,
otherwise it waits, armed.

Remaining only falls while the quantity in force stays the same (deductions), so a fired rule
can only become armed again through a change of the quantity in force or of the rule: that is
the re-arming above. A scope with no packages in force (quantity in force 0) never fires:
there is no quota to warn about.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


class AlertState(enum.IntEnum):
    ARMED = 1
    FIRED = 2


@dataclass(frozen=True)
class Threshold:
    """Exactly one of `quantity` (calls left) and `percent` (of the quantity in force, in
    (0, 100])."""

    quantity: int | None = None
    percent: Decimal | None = None

    def __post_init__(self) -> None:
        if (self.quantity is None) == (self.percent is None):
            raise ValueError("a threshold is a quantity or a percent, not both or neither")
        if self.quantity is not None and self.quantity < 0:
            raise ValueError("threshold quantity must be >= 0")
        if self.percent is not None and not Decimal(0) < self.percent <= Decimal(100):
            raise ValueError("threshold percent must be in (0, 100]")

    def reached(self, remaining: int, in_force: int) -> bool:
        if in_force <= 0:
            return False
        if self.quantity is not None:
            return remaining <= self.quantity
        # remaining / in_force <= percent / 100, in exact arithmetic.
        return Decimal(remaining) * 100 <= Decimal(in_force) * self.percent


@dataclass(frozen=True)
class AlertRule:
    alert_id: str
    account_id: str
    region: str
    api: str  # "" = every API of the region
    threshold: Threshold
    enabled: bool
    create_time: datetime
    update_time: datetime

    def watches(self, account_id: str, region: str, api: str) -> bool:
        return self.account_id == account_id and self.region == region and self.api in ("", api)


@dataclass(frozen=True)
class Evaluation:
    state: AlertState
    fired: bool


def evaluate(
    state: AlertState, threshold: Threshold, remaining: int, in_force: int, rearm: bool
) -> Evaluation:
    """The rule's next state; `rearm` when the quantity in force or the rule itself just changed."""
    if rearm:
        state = AlertState.ARMED
    if state == AlertState.ARMED and threshold.reached(remaining, in_force):
        return Evaluation(AlertState.FIRED, True)
    return Evaluation(state, False)
