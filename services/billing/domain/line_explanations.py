"""Explaining a pay-per-use bill line (docs/design/billing.md, "Explaining a pay-per-use line").

A pay-per-use line is the calls of one account, region and API in one hourly cycle that no
package paid. Its events are quota's; each is explained by the quota service of its region,
which also lists the account's packages there that did not pay (near misses). Quota knows only
its own deployment's regions; billing knows every package it sold, in every region, so it adds
the packages of the same API sold in other regions and in force at the call
(``OTHER_REGION``). Quota lists near misses most likely cause first and ``OTHER_REGION`` last;
billing keeps quota's order and appends its own after quota's ``OTHER_REGION`` ones, all of
them by package id, one entry per package, at most ``MAX_NEAR_MISSES``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from services.billing.domain.usage import RecordedUsage
from shared.validity import ONE_SECOND, as_utc

# Quota's NearMissReason number for "a package of the same API in another region" (the
# contract's enum; billing adds only these).
OTHER_REGION = 1
MAX_NEAR_MISSES = 50


@dataclass(frozen=True)
class NearMissSeen:
    """A package that did not pay for an event, as quota (or billing) names it."""

    package_id: str
    region: str
    api: str
    enterprise_project_id: str
    reason: int  # quota's NearMissReason number


@dataclass(frozen=True)
class SoldInForce:
    """A package billing sold: its region, API, project and validity as billing knows them
    (the purchase's effective time, the expiry moved by renewals)."""

    package_id: str
    region: str
    api: str
    enterprise_project_id: str
    effective_time: datetime
    expire_time: datetime  # the last covered second

    def in_force_at(self, t: datetime) -> bool:
        t = as_utc(t, "t")
        return self.effective_time <= t < self.expire_time + ONE_SECOND


@dataclass(frozen=True)
class Explained:
    """Quota's explanation of one event (None when quota did not answer)."""

    explanation: object | None  # quota's answer, passed through to the response
    near_misses: tuple[NearMissSeen, ...]


@dataclass(frozen=True)
class LineEvent:
    usage: RecordedUsage
    explanation: object | None
    near_misses: tuple[NearMissSeen, ...]
    unavailable: bool


def merged_near_misses(
    quota_misses: Iterable[NearMissSeen],
    sold: Iterable[SoldInForce],
    usage: RecordedUsage,
    limit: int = MAX_NEAR_MISSES,
) -> tuple[NearMissSeen, ...]:
    """Quota's near misses of ``usage`` followed by the packages of ``sold`` in other regions,
    for the same API and in force at the call, that quota did not list."""
    listed = list(quota_misses)
    known = {m.package_id for m in listed}
    first = [m for m in listed if m.reason != OTHER_REGION]
    regional = [m for m in listed if m.reason == OTHER_REGION]
    for package in sold:
        if package.package_id in known or package.region == usage.region:
            continue
        if package.api != usage.api or not package.in_force_at(usage.occur_time):
            continue
        known.add(package.package_id)
        regional.append(
            NearMissSeen(
                package.package_id,
                package.region,
                package.api,
                package.enterprise_project_id,
                OTHER_REGION,
            )
        )
    regional.sort(key=lambda m: m.package_id)
    return tuple([*first, *regional][:limit])


def line_event(
    usage: RecordedUsage, explained: Explained | None, sold: Iterable[SoldInForce]
) -> LineEvent:
    """One event of the line, explained (``explained`` None: quota did not answer)."""
    if explained is None:
        return LineEvent(usage, None, merged_near_misses((), sold, usage), True)
    return LineEvent(
        usage,
        explained.explanation,
        merged_near_misses(explained.near_misses, sold, usage),
        False,
    )
