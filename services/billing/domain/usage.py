"""Pay-per-use as billing receives it: calls no package covered, counted into hourly cycles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class RecordedUsage:
    """One ``pay_per_use_recorded`` event of quota: ``quantity`` calls at ``occur_time``."""

    event_id: str
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    quantity: int
    occur_time: datetime
    # Quota's id of the usage event ("" from a quota that does not send it).
    usage_event_id: str = ""


@dataclass(frozen=True)
class CycleKey:
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    cycle_start_us: int


@dataclass(frozen=True)
class UsageCycle:
    """The calls of one account, region, API and project in one hourly cycle."""

    key: CycleKey
    cycle_end_us: int
    quantity: int
    settled: bool
    entry_id: str  # the ledger line of its last settlement ("" before the first)


class Unpriceable(Exception):
    """The catalog cannot price a cycle (its API is not in billing's catalog)."""
