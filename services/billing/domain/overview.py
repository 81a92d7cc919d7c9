"""The console's account-wide view: what billing shows of an account's packages, pay-per-use
and usage alerts across regions (docs/design/billing.md, "Account overview").

Quota is regional, billing global: billing reads each region's quota service and adds its own
records. The rules here are pure: how a region's packages in force are summed per API, and
which usage alerts nobody would hear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from services.billing.domain.accounts import Account


@dataclass(frozen=True)
class PackageSeen:
    """A package as a region's quota service listed it. ``wire`` is quota's own message,
    handed back unchanged to callers of ListAccountPackages (billing does not own packages)."""

    package_id: str
    region: str
    api: str
    enterprise_project_id: str
    total_quantity: int
    remaining_quantity: int
    expire_time: datetime
    wire: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AlertSeen:
    """A usage alert rule as a region's quota service listed it (``wire`` as above)."""

    alert_id: str
    region: str
    api: str
    enabled: bool
    # "" = the customer's own rule; else the suite feature that keeps it (an auto-replenish
    # setting's rule: "auto_replenish"), which is not one of the customer's alerts.
    owner: str = ""
    wire: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MonthUsage:
    """Billing's pay-per-use record of one region and API this month: calls recorded (the
    running, unsettled hour included) and what the settled cycles cost (micro-units, >= 0)."""

    quantity: int = 0
    charge_micros: int = 0


@dataclass(frozen=True)
class ApiFigures:
    api: str
    packages_in_force: int
    remaining_quantity: int
    total_quantity: int
    next_expire_time: datetime | None
    pay_per_use_quantity_month: int
    pay_per_use_charge_month: int  # micro-units, non-negative


@dataclass(frozen=True)
class RegionFigures:
    region: str
    available: bool
    apis: tuple[ApiFigures, ...]


@dataclass(frozen=True)
class AccountOverview:
    account: Account
    regions: tuple[RegionFigures, ...]
    unheard_alerts: tuple[AlertSeen, ...]
    notification_available: bool


def region_figures(
    region: str,
    available: bool,
    in_force: Iterable[PackageSeen],
    month: dict[str, MonthUsage],
) -> RegionFigures:
    """One region's entry: per API (ordered by id) that has packages in force or pay-per-use
    this month, the packages in force summed, and the next expiry of those with calls left.
    ``in_force`` is what quota listed as ACTIVE or EXHAUSTED (nothing when unavailable)."""
    by_api: dict[str, list[PackageSeen]] = {}
    for package in in_force:
        by_api.setdefault(package.api, []).append(package)
    apis = []
    for api in sorted(set(by_api) | {a for a, m in month.items() if m.quantity or m.charge_micros}):
        packages = by_api.get(api, [])
        expiring = [p.expire_time for p in packages if p.remaining_quantity > 0]
        usage = month.get(api, MonthUsage())
        apis.append(
            ApiFigures(
                api=api,
                packages_in_force=len(packages),
                remaining_quantity=sum(p.remaining_quantity for p in packages),
                total_quantity=sum(p.total_quantity for p in packages),
                next_expire_time=min(expiring) if expiring else None,
                pay_per_use_quantity_month=usage.quantity,
                pay_per_use_charge_month=usage.charge_micros,
            )
        )
    return RegionFigures(region, available, tuple(apis))


def unheard_alerts(alerts: Iterable[AlertSeen], audience: int | None) -> tuple[AlertSeen, ...]:
    """The enabled rules of the customer nobody would hear: all of them when no contact of the
    account is subscribed to usage alerts (``audience`` 0); none when somebody is, or when
    notification could not tell (``audience`` None: unknown, not "unheard"). Rules the system
    owns (an auto-replenish setting's) are not the customer's alerts and are never heard by
    design: they are left out."""
    if audience is None or audience > 0:
        return ()
    return tuple(a for a in alerts if a.enabled and not a.owner)
