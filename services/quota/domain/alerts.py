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

Forecast conditions (docs/design/forecasts.md) — used up within N days, more than N calls
forfeited at one expiry — follow the forecast, not each deduction: they are evaluated by the
service's due work and on the same changes as above, and are edge-triggered on the condition
itself (`evaluate_forecast`): a rule fires when it is armed and the condition holds, and is
re-armed whenever an evaluation finds the condition false (after a purchase, say).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.quota.domain.forecast import Forecast


class AlertState(enum.IntEnum):
    ARMED = 1
    FIRED = 2


class AlertCondition(enum.IntEnum):
    """What a rule watches (the wire's AlertCondition numbers)."""

    REMAINING_QUANTITY = 1
    REMAINING_PERCENT = 2
    DEPLETION_WITHIN_DAYS = 3
    FORFEITURE_ABOVE_QUANTITY = 4


MAX_DEPLETION_DAYS = 3650

# The owner of the rule of an auto-replenish setting (docs/design/auto-replenish.md).
OWNER_AUTO_REPLENISH = "auto_replenish"
# What an owner may be: lowercase letters, digits and "_", starting with a letter.
OWNER_MAX_LENGTH = 40


def owner_is_valid(owner: str) -> bool:
    return (
        0 < len(owner) <= OWNER_MAX_LENGTH
        and owner[0].isascii()
        and owner[0].islower()
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in owner)
    )


@dataclass(frozen=True)
class Threshold:
    """Exactly one of `quantity` (calls left), `percent` (of the quantity in force, in
    (0, 100]), `depletion_days` (used up within, 1 to MAX_DEPLETION_DAYS days) and
    `forfeiture_quantity` (more than this many calls forfeited at one expiry)."""

    quantity: int | None = None
    percent: Decimal | None = None
    depletion_days: int | None = None
    forfeiture_quantity: int | None = None

    def __post_init__(self) -> None:
        given = [
            v
            for v in (self.quantity, self.percent, self.depletion_days, self.forfeiture_quantity)
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError("a threshold is exactly one condition")
        if self.quantity is not None and self.quantity < 0:
            raise ValueError("threshold quantity must be >= 0")
        if self.percent is not None and not Decimal(0) < self.percent <= Decimal(100):
            raise ValueError("threshold percent must be in (0, 100]")
        if self.depletion_days is not None and not 1 <= self.depletion_days <= MAX_DEPLETION_DAYS:
            raise ValueError(f"depletion days must be in [1, {MAX_DEPLETION_DAYS}]")
        if self.forfeiture_quantity is not None and self.forfeiture_quantity < 0:
            raise ValueError("forfeiture quantity must be >= 0")

    @property
    def condition(self) -> AlertCondition:
        if self.quantity is not None:
            return AlertCondition.REMAINING_QUANTITY
        if self.percent is not None:
            return AlertCondition.REMAINING_PERCENT
        if self.depletion_days is not None:
            return AlertCondition.DEPLETION_WITHIN_DAYS
        return AlertCondition.FORFEITURE_ABOVE_QUANTITY

    @property
    def is_forecast(self) -> bool:
        return self.depletion_days is not None or self.forfeiture_quantity is not None

    def forecast_holds(self, forecast: Forecast, now: datetime) -> bool:
        """Whether a forecast condition holds for `forecast` made at `now`."""
        if self.depletion_days is not None:
            return forecast.depleted_within(now, self.depletion_days)
        if self.forfeiture_quantity is not None:
            largest = forecast.largest_forfeiture()
            return largest is not None and largest.quantity > self.forfeiture_quantity
        raise ValueError("not a forecast condition")

    def reached(self, remaining: int, in_force: int) -> bool:
        if in_force <= 0 or self.is_forecast:
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
    # "" = the customer's own rule; else the suite feature that keeps it (docs/design/
    # usage-alerts.md, "Owned rules"), e.g. OWNER_AUTO_REPLENISH.
    owner: str = ""

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


def evaluate_forecast(state: AlertState, holds: bool) -> Evaluation:
    """A forecast rule's next state: fires when armed and the condition holds; re-armed when
    it does not hold."""
    if not holds:
        return Evaluation(AlertState.ARMED, False)
    if state == AlertState.ARMED:
        return Evaluation(AlertState.FIRED, True)
    return Evaluation(state, False)
