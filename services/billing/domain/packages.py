"""Billing's record of a package it sold (the owner, the offer, the expiry as billing sold it)
and its auto-renewal setting and schedule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.errors import FailedPrecondition, NotFound


@dataclass(frozen=True)
class SoldPackage:
    package_id: str
    account_id: str
    offer_id: str
    region: str
    order_id: str
    expire_time: datetime
    auto_renew: bool
    lead_days: int
    next_attempt_time: datetime | None
    last_attempt_time: datetime | None
    last_failure_reason: str


class UnknownPackage(Exception):
    """Billing has no record of the package: it does not exist, was not bought through billing,
    or was cancelled. ``renewals.explained`` tells which."""

    def __init__(self, package_id: str) -> None:
        super().__init__(package_id)
        self.package_id = package_id


def package_not_found(package_id: str) -> NotFound:
    return NotFound("PACKAGE_NOT_FOUND", f"no package {package_id!r}", package_id=package_id)


def not_renewable(package_id: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "PACKAGE_NOT_RENEWABLE",
        f"package {package_id!r} cannot be renewed: {why}",
        package_id=package_id,
    )
