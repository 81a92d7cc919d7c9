"""RPCs of the usage-alerts-and-events issue answer UNIMPLEMENTED until they are built."""

from __future__ import annotations

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2

from tests.support.quota_calls import ACCOUNT, API, REGION, QuotaCalls, expect_error

UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


async def test_create_usage_alert_is_unimplemented(q):
    alert = quota_pb2.UsageAlert(
        account_id=ACCOUNT, region=REGION, api=API, remaining_percent=20.0, enabled=True
    )
    request = quota_service_pb2.CreateUsageAlertRequest(request_id="a1", usage_alert=alert)

    await expect_error(
        q.stub.CreateUsageAlert(request, metadata=q.admin), UNIMPLEMENTED, "NOT_IMPLEMENTED"
    )


async def test_watch_events_is_unimplemented(q):
    call = q.stub.WatchEvents(quota_service_pb2.WatchEventsRequest(), metadata=q.admin)

    async def first_event():
        async for event in call:
            return event

    await expect_error(first_event(), UNIMPLEMENTED, "NOT_IMPLEMENTED")
