"""Near misses: the account's packages that did not pay for a pay-per-use call, and why.

"Why was I charged pay-per-use although I have a package?" The explanation of an event lists
its candidates (packages of the same region and API); a near miss may also be a package of
another API in the same region, or of the same API in another region, that was in force at
the call (docs/design/deduction-order.md, "Explaining a deduction").

Near misses are listed most likely cause first:

1. packages of the event's region and API, by the reason they could not pay:
   ``OTHER_PROJECT`` (in force, only the project differs), ``NOT_YET_EFFECTIVE`` (the one
   starting soonest after the call first), ``EXPIRED`` (the one expired most recently first),
   ``EXHAUSTED``, ``REVOKED``;
2. ``OTHER_API``: packages of another API in the event's region, in force at the call;
3. ``OTHER_REGION``: packages of the event's API in another region, in force at the call.

Ties go by package id. At most ``MAX_NEAR_MISSES`` are listed. Only events with pay-per-use
calls have near misses: a call a package paid in full needs no excuse.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from services.quota.domain.deduction import IneligibleReason
from services.quota.domain.packages import Package
from shared.validity import ONE_SECOND, as_utc

MAX_NEAR_MISSES = 50


class NearMissReason(enum.IntEnum):
    """The wire's numbers; the listing order is ``_RANK``."""

    OTHER_REGION = 1
    OTHER_API = 2
    OTHER_PROJECT = 3
    NOT_YET_EFFECTIVE = 4
    EXPIRED = 5
    EXHAUSTED = 6
    REVOKED = 7


_RANK = {
    NearMissReason.OTHER_PROJECT: 0,
    NearMissReason.NOT_YET_EFFECTIVE: 1,
    NearMissReason.EXPIRED: 2,
    NearMissReason.EXHAUSTED: 3,
    NearMissReason.REVOKED: 4,
    NearMissReason.OTHER_API: 5,
    NearMissReason.OTHER_REGION: 6,
}

_FROM_INELIGIBLE = {
    IneligibleReason.OTHER_PROJECT: NearMissReason.OTHER_PROJECT,
    IneligibleReason.NOT_YET_EFFECTIVE: NearMissReason.NOT_YET_EFFECTIVE,
    IneligibleReason.EXPIRED: NearMissReason.EXPIRED,
    IneligibleReason.EXHAUSTED: NearMissReason.EXHAUSTED,
    IneligibleReason.REVOKED: NearMissReason.REVOKED,
}


@dataclass(frozen=True)
class NearMiss:
    package_id: str
    region: str
    api: str
    enterprise_project_id: str  # "" = every project
    reason: NearMissReason
    # When the package starts and ends (its last covered second): the order within a reason.
    effective_time: datetime
    expire_time: datetime


def near_miss_key(miss: NearMiss) -> tuple:
    """The listing order: the reason's rank, then closeness in time, then the package id."""
    closeness: float = 0.0
    if miss.reason == NearMissReason.NOT_YET_EFFECTIVE:
        closeness = miss.effective_time.timestamp()  # starting soonest first
    elif miss.reason == NearMissReason.EXPIRED:
        closeness = -miss.expire_time.timestamp()  # expired most recently first
    return (_RANK[miss.reason], closeness, miss.package_id)


def ordered(misses: Iterable[NearMiss], limit: int = MAX_NEAR_MISSES) -> tuple[NearMiss, ...]:
    """Near misses in listing order, one per package (the likelier reason wins), at most
    ``limit``."""
    best: dict[str, NearMiss] = {}
    for miss in misses:
        known = best.get(miss.package_id)
        if known is None or near_miss_key(miss) < near_miss_key(known):
            best[miss.package_id] = miss
    return tuple(sorted(best.values(), key=near_miss_key)[:limit])


def in_force_at(package: Package, t: datetime, recorded_at: datetime) -> bool:
    """Whether ``package`` was in force at the call ``t`` as known when the event was recorded
    at ``recorded_at``: created and not revoked by then, effective at ``t``, not expired."""
    t, recorded_at = as_utc(t, "t"), as_utc(recorded_at, "recorded_at")
    if package.create_time > recorded_at:
        return False
    if package.revoke_time is not None and package.revoke_time <= recorded_at:
        return False
    return package.effective_time <= t < package.expire_time + ONE_SECOND


def _miss(package: Package, reason: NearMissReason) -> NearMiss:
    return NearMiss(
        package.package_id,
        package.region,
        package.api,
        package.enterprise_project_id,
        reason,
        package.effective_time,
        package.expire_time,
    )


@dataclass(frozen=True)
class ExplainedEvent:
    """What near misses are computed from: the event as recorded."""

    region: str
    api: str
    occur_time: datetime
    record_time: datetime
    pay_per_use_quantity: int


def near_misses(
    event: ExplainedEvent,
    ineligible: Mapping[str, IneligibleReason],
    scope_packages: Iterable[Package],
    others: Iterable[Package],
) -> tuple[NearMiss, ...]:
    """The near misses of ``event``.

    ``ineligible`` maps the packages of the event's region and API that could not pay to the
    reason its explanation gives (as recorded); ``scope_packages`` are those packages (for
    their region, API, project and times); ``others`` are the account's packages of other
    APIs or regions, of which those in force at the call are listed.
    """
    if event.pay_per_use_quantity <= 0:
        return ()
    found: list[NearMiss] = []
    for package in scope_packages:
        reason = ineligible.get(package.package_id)
        if reason is not None:
            found.append(_miss(package, _FROM_INELIGIBLE[reason]))
    for package in others:
        if package.region == event.region and package.api == event.api:
            continue
        if package.region != event.region and package.api != event.api:
            continue  # another API in another region: too far off to be the cause
        if not in_force_at(package, event.occur_time, event.record_time):
            continue
        same_region = package.region == event.region
        reason = NearMissReason.OTHER_API if same_region else NearMissReason.OTHER_REGION
        found.append(_miss(package, reason))
    return ordered(found)
