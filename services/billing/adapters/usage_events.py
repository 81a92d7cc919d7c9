"""Quota's ``pay_per_use_recorded`` and ``threshold_crossed`` events as billing's domain
values."""

from __future__ import annotations

from allot.quota.v1 import quota_pb2

from services.billing.domain.replenish import Crossing
from services.billing.domain.usage import RecordedUsage
from shared.timeutil import from_timestamp

PAY_PER_USE_RECORDED = "pay_per_use_recorded"
THRESHOLD_CROSSED = "threshold_crossed"


def recorded_usage(event: quota_pb2.QuotaEvent) -> RecordedUsage | None:
    """The pay-per-use an event recorded (None for any other event). Its instant is the
    usage's ``occur_time``, else the event's ``create_time``."""
    if event.WhichOneof("payload") != PAY_PER_USE_RECORDED:
        return None
    usage = event.pay_per_use_recorded
    stamp = usage.occur_time if usage.HasField("occur_time") else event.create_time
    return RecordedUsage(
        event_id=event.event_id,
        account_id=usage.account_id,
        region=usage.region,
        api=usage.api,
        enterprise_project_id=usage.enterprise_project_id,
        quantity=usage.quantity,
        occur_time=from_timestamp(stamp, "occur_time"),
        usage_event_id=usage.usage_event_id,
    )


def crossing(event: quota_pb2.QuotaEvent) -> Crossing | None:
    """The usage alert crossing an event announced (None for any other event); auto-replenish
    acts on the crossings of its own rules (docs/design/auto-replenish.md)."""
    if event.WhichOneof("payload") != THRESHOLD_CROSSED:
        return None
    crossed = event.threshold_crossed
    return Crossing(
        event_id=event.event_id,
        alert_id=crossed.alert_id,
        account_id=crossed.account_id,
        region=crossed.region,
        api=crossed.api,
        remaining_quantity=crossed.remaining_quantity,
        time=from_timestamp(event.create_time, "create_time")
        if event.HasField("create_time")
        else None,
    )
