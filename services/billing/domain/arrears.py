"""Arrears: an account's standing as its balance goes below zero and back.

The lifecycle (docs/design/arrears.md)
======================================

A zero balance does not stop calls at request time: usage is always recorded and settled
afterwards. What moves an account is the balance after money moves:

- ``GOOD`` → ``GRACE`` when a charge (a pay-per-use settlement, in practice) leaves the balance
  **below zero**; exactly zero is still good. Grace starts at that instant and lasts the
  account's grace period (default 15 days); retention follows it (default 15 days). Both ends
  are fixed when grace starts, so a later change of the account's policy does not move them.
  Further charges while in arrears change nothing: the clock keeps running from the first one.
- ``GRACE`` → ``FROZEN`` at the end of grace; ``FROZEN`` → ``RELEASED`` at the end of
  retention. ``advance`` applies every change that has come due by ``now``, each stamped with
  the instant it was due, not with ``now``: a clock moved a month ahead yields both changes at
  their own times.
- A credit (a top-up, or the refund of a cancelled order) that brings the balance to **zero or
  above** settles the debt and returns the account to ``GOOD`` at once, from ``GRACE``,
  ``FROZEN`` or ``RELEASED``. For ``RELEASED`` the account is usable again, but what release
  did is not undone: its API subscriptions were cancelled and stay cancelled, and the customer
  subscribes again (which needs a ``GOOD`` standing). A credit that leaves a debt changes
  nothing.

Periods are elapsed time (a protobuf Duration), not calendar days: 15 days is 360 hours even
across a change of the clocks. Example: zero balance, pay-per-use settled at 2024-05-01 11:00
→ ``GRACE`` from then, ``FROZEN`` at 2024-05-16 11:00, ``RELEASED`` at 2024-05-31 11:00; a
top-up on 2024-05-10 that covers the debt → ``GOOD`` at once.

What each standing allows: purchases, renewals and new API subscriptions need ``GOOD``
(``may_purchase``); calls are admitted in ``GOOD`` and ``GRACE`` (``may_call``), refused when
``FROZEN`` or ``RELEASED``.

The functions are pure. A caller handling an event at ``now`` first applies ``advance(state,
now)`` (publishing its changes), then ``after_charge`` or ``after_top_up``, so the history of
standings is told in the order it happened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from shared.validity import as_utc

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_RETENTION_PERIOD",
    "ArrearsState",
    "Standing",
    "StandingChange",
    "advance",
    "after_charge",
    "after_top_up",
    "may_call",
    "may_purchase",
    "next_due_time",
]

DEFAULT_GRACE_PERIOD = timedelta(days=15)
DEFAULT_RETENTION_PERIOD = timedelta(days=15)


class Standing(enum.IntEnum):
    """The account's standing; the values are those of ``AccountStanding`` in the protos."""

    GOOD = 1
    GRACE = 2
    FROZEN = 3
    RELEASED = 4


_IN_ARREARS = frozenset({Standing.GRACE, Standing.FROZEN, Standing.RELEASED})


@dataclass(frozen=True)
class ArrearsState:
    """An account's standing, since when, and (in arrears) when grace and retention end.

    ``since`` is the instant the current standing began (``None`` for an account that has
    always been good). ``grace_end`` and ``retention_end`` are set exactly while in arrears.
    """

    standing: Standing
    since: datetime | None = None
    grace_end: datetime | None = None
    retention_end: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "standing", Standing(self.standing))
        for name in ("since", "grace_end", "retention_end"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value, name))
        if self.standing == Standing.GOOD:
            if self.grace_end is not None or self.retention_end is not None:
                raise ValueError("a good account has no grace or retention end")
            return
        if self.since is None or self.grace_end is None or self.retention_end is None:
            raise ValueError(f"{self.standing.name}: since, grace_end and retention_end are set")
        if not self.grace_end <= self.retention_end:
            raise ValueError("retention cannot end before grace")

    @classmethod
    def good(cls, since: datetime | None = None) -> ArrearsState:
        return cls(Standing.GOOD, since)


@dataclass(frozen=True)
class StandingChange:
    """One change of standing at ``change_time``; ``state`` is the state from then on."""

    previous: Standing
    standing: Standing
    change_time: datetime
    state: ArrearsState


def _require_period(value: timedelta, name: str) -> None:
    if not isinstance(value, timedelta):
        raise TypeError(f"{name} must be a timedelta, got {type(value).__name__}")
    if value < timedelta(0):
        raise ValueError(f"{name} must not be negative, got {value}")


def after_charge(
    state: ArrearsState,
    balance_micros: int,
    now: datetime,
    grace_period: timedelta = DEFAULT_GRACE_PERIOD,
    retention_period: timedelta = DEFAULT_RETENTION_PERIOD,
) -> ArrearsState:
    """The state after a charge left the balance at ``balance_micros`` at ``now``.

    A good account whose balance is now below zero enters grace at ``now``; anything else is
    returned unchanged.
    """
    now = as_utc(now, "now")
    _require_period(grace_period, "grace_period")
    _require_period(retention_period, "retention_period")
    if state.standing != Standing.GOOD or balance_micros >= 0:
        return state
    grace_end = now + grace_period
    return ArrearsState(Standing.GRACE, now, grace_end, grace_end + retention_period)


def after_top_up(state: ArrearsState, balance_micros: int, now: datetime) -> ArrearsState:
    """The state after a credit (top-up or refund) left the balance at ``balance_micros``.

    In arrears with the balance now zero or above: ``GOOD`` at ``now``. Otherwise unchanged.
    """
    now = as_utc(now, "now")
    if state.standing in _IN_ARREARS and balance_micros >= 0:
        return ArrearsState.good(now)
    return state


def next_due_time(state: ArrearsState) -> datetime | None:
    """When the clock alone will next change the standing; ``None`` if it never will."""
    if state.standing == Standing.GRACE:
        return state.grace_end
    if state.standing == Standing.FROZEN:
        return state.retention_end
    return None


def advance(state: ArrearsState, now: datetime) -> list[StandingChange]:
    """The changes of standing that have come due by ``now``, oldest first (maybe none).

    ``GRACE`` becomes ``FROZEN`` at ``grace_end`` and ``FROZEN`` becomes ``RELEASED`` at
    ``retention_end``, each when ``now`` has reached that instant. The final state is the last
    change's ``state``, or ``state`` itself when the list is empty.
    """
    now = as_utc(now, "now")
    changes: list[StandingChange] = []
    while (due := next_due_time(state)) is not None and now >= due:
        following = Standing.FROZEN if state.standing == Standing.GRACE else Standing.RELEASED
        new_state = replace(state, standing=following, since=due)
        changes.append(StandingChange(state.standing, following, due, new_state))
        state = new_state
    return changes


def may_purchase(standing: Standing) -> bool:
    """Purchases, renewals and API subscriptions are refused in arrears."""
    return Standing(standing) == Standing.GOOD


def may_call(standing: Standing) -> bool:
    """Calls (package and pay-per-use) are admitted in good standing and in grace."""
    return Standing(standing) in (Standing.GOOD, Standing.GRACE)
