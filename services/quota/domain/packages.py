"""Packages of prepaid calls: their lifecycle, their project scope and the totals in force.

A package grants ``total_quantity`` successful calls of one API in one region to one account,
for one enterprise project or for all of them (docs/design/deduction-order.md). Everything here
is derived from the package and an injected ``now``; nothing reads a clock or a database.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from shared.projects import normalize_project_id
from shared.validity import ONE_SECOND, as_utc


class PackageSource(enum.IntEnum):
    """Where a package came from; the values are also the deduction order of sources."""

    FREE = 1
    PROMOTION = 2
    SUBSCRIPTION = 3


class PackageState(enum.IntEnum):
    PENDING = 1
    ACTIVE = 2
    EXHAUSTED = 3
    EXPIRED = 4
    REVOKED = 5


# enterprise_project_id of a package valid for every project of its account.
ALL_PROJECTS = ""


def _require_quantity(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


@dataclass(frozen=True)
class Package:
    """A grant of ``total_quantity`` calls; ``expire_time`` is the LAST covered second.

    Datetimes must be timezone-aware and are stored in UTC.
    """

    package_id: str
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    source: PackageSource
    total_quantity: int
    used_quantity: int
    effective_time: datetime
    expire_time: datetime
    create_time: datetime
    revoke_time: datetime | None = None
    order_id: str = ""

    def __post_init__(self) -> None:
        for name in ("effective_time", "expire_time", "create_time"):
            object.__setattr__(self, name, as_utc(getattr(self, name), name))
        if self.revoke_time is not None:
            object.__setattr__(self, "revoke_time", as_utc(self.revoke_time, "revoke_time"))
        object.__setattr__(self, "source", PackageSource(self.source))
        _require_quantity(self.total_quantity, "total_quantity")
        _require_quantity(self.used_quantity, "used_quantity")
        if self.total_quantity < 0:
            raise ValueError(f"total_quantity must be >= 0, got {self.total_quantity}")
        if not 0 <= self.used_quantity <= self.total_quantity:
            raise ValueError(
                f"used_quantity must be within 0..{self.total_quantity}, got {self.used_quantity}"
            )
        project = self.enterprise_project_id
        if project != ALL_PROJECTS and normalize_project_id(project) != project:
            raise ValueError(f"malformed enterprise_project_id {project!r}")

    @property
    def remaining_quantity(self) -> int:
        return self.total_quantity - self.used_quantity

    def covers(self, t: datetime) -> bool:
        """Whether instant ``t`` lies in the validity period (last second included)."""
        t = as_utc(t, "t")
        return self.effective_time <= t < self.expire_time + ONE_SECOND

    def state_at(self, now: datetime) -> PackageState:
        """The lifecycle state at ``now``; the first matching state wins.

        Revocation is final and overrides everything; an expired package stays expired whatever
        it has left (the remainder is forfeited); exhaustion is only reported while in force.
        """
        now = as_utc(now, "now")
        if self.revoke_time is not None and self.revoke_time <= now:
            return PackageState.REVOKED
        if now >= self.expire_time + ONE_SECOND:
            return PackageState.EXPIRED
        if now < self.effective_time:
            return PackageState.PENDING
        if self.remaining_quantity == 0:
            return PackageState.EXHAUSTED
        return PackageState.ACTIVE

    def in_force_at(self, now: datetime) -> bool:
        """Whether the package counts towards quota totals and alerts at ``now``."""
        return self.state_at(now) in IN_FORCE


# The states that count towards aggregates and alerts.
IN_FORCE = frozenset({PackageState.ACTIVE, PackageState.EXHAUSTED})


@dataclass(frozen=True)
class QuotaTotals:
    """The packages in force of one scope, summed: the quantity in force (docs/architecture.md,
    "Conventions")."""

    quantity_in_force: int
    used_quantity: int
    remaining_quantity: int
    active_package_count: int


def totals_in_force(packages: Iterable[Package], now: datetime) -> QuotaTotals:
    """Sum the packages in force (ACTIVE or EXHAUSTED) at ``now``.

    The caller chooses the scope (one account, region and API); every package given is
    considered. ``active_package_count`` counts only ACTIVE packages.
    """
    now = as_utc(now, "now")
    total = used = active = 0
    for package in packages:
        state = package.state_at(now)
        if state not in IN_FORCE:
            continue
        total += package.total_quantity
        used += package.used_quantity
        if state is PackageState.ACTIVE:
            active += 1
    return QuotaTotals(
        quantity_in_force=total,
        used_quantity=used,
        remaining_quantity=total - used,
        active_package_count=active,
    )
