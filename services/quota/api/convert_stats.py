"""Protobuf of GetUsageStats; to be merged into convert.py (kept apart while it was built)."""

from __future__ import annotations

from collections.abc import Sequence

from allot.quota.v1 import quota_pb2, quota_service_pb2

from services.quota.app.stats import StatsBucket
from shared.timeutil import to_timestamp


def to_proto_usage_stats(buckets: Sequence[StatsBucket]) -> quota_service_pb2.GetUsageStatsResponse:
    return quota_service_pb2.GetUsageStatsResponse(
        buckets=[
            quota_pb2.UsageStatsBucket(
                start_time=to_timestamp(b.start_time),
                successful_calls=b.successful_calls,
                failed_calls=b.failed_calls,
                package_quantity=b.package_quantity,
                pay_per_use_quantity=b.pay_per_use_quantity,
            )
            for b in buckets
        ]
    )
