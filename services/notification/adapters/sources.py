"""Source events of other services' streams, as notification's domain events.

Only the events a person should hear about become messages: quota's `threshold_crossed`,
`package_expiring`, and `package_state_changed` into EXHAUSTED. Everything else is None.
"""

from __future__ import annotations

from allot.quota.v1 import quota_pb2

from services.notification.domain.messages import (
    PackageExhausted,
    PackageExpiring,
    SourceEvent,
    UsageAlertFired,
)
from shared.timeutil import EPOCH, from_timestamp

QUOTA_EVENT_TYPES = ("threshold_crossed", "package_expiring", "package_state_changed")


def _threshold(payload: quota_pb2.ThresholdCrossed) -> str:
    if payload.WhichOneof("threshold") == "threshold_percent":
        return f"{payload.threshold_percent:g}%"
    return f"{payload.threshold_quantity:,} calls"


def from_quota_event(event: quota_pb2.QuotaEvent) -> SourceEvent | None:
    kind = event.WhichOneof("payload")
    if kind == "threshold_crossed":
        p = event.threshold_crossed
        return UsageAlertFired(
            alert_id=p.alert_id,
            account_id=p.account_id,
            region=p.region,
            api=p.api,
            remaining_quantity=p.remaining_quantity,
            total_quantity=p.total_quantity,
            threshold=_threshold(p),
        )
    if kind == "package_expiring":
        pkg = event.package_expiring.package
        return PackageExpiring(
            package_id=pkg.package_id,
            account_id=pkg.account_id,
            region=pkg.region,
            api=pkg.api,
            remaining_quantity=pkg.remaining_quantity,
            total_quantity=pkg.total_quantity,
            expire_time=from_timestamp(pkg.expire_time, "expire_time"),
            days_left=event.package_expiring.days_left,
        )
    if kind == "package_state_changed":
        pkg = event.package_state_changed.package
        if pkg.state != quota_pb2.PACKAGE_STATE_EXHAUSTED:
            return None
        return PackageExhausted(
            package_id=pkg.package_id,
            account_id=pkg.account_id,
            region=pkg.region,
            api=pkg.api,
            total_quantity=pkg.total_quantity,
            expire_time=from_timestamp(pkg.expire_time, "expire_time")
            if pkg.HasField("expire_time")
            else EPOCH,
        )
    return None
