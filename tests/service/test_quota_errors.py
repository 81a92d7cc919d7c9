"""Malformed and refused requests fail with the contract's code, reason and field, and write
nothing (docs/contract.md, "Errors" and "Idempotency")."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2
from google.protobuf import timestamp_pb2

from tests.support.calls import expect_error
from tests.support.quota import ACCOUNT, OTHER_REGION, REGION, START, QuotaCalls, quota_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


MALFORMED_EVENTS = [
    ({"quantity": -1}, "quantity", "INVALID_FIELD"),
    ({"account_id": ""}, "account_id", "INVALID_FIELD"),
    ({"event_id": ""}, "event_id", "INVALID_FIELD"),
    ({"http_status": 0}, "http_status", "INVALID_FIELD"),
    ({"http_status": 600}, "http_status", "INVALID_FIELD"),
    ({"occur": START + timedelta(days=1)}, "occur_time", "INVALID_FIELD"),
    ({"occur": timestamp_pb2.Timestamp(seconds=1, nanos=-1)}, "occur_time", "INVALID_FIELD"),
    (
        {"occur": timestamp_pb2.Timestamp(seconds=1, nanos=1_000_000_000)},
        "occur_time",
        "INVALID_FIELD",
    ),
    ({"region": "mars-north-1"}, "region", "UNKNOWN_REGION"),
    ({"region": ""}, "region", "INVALID_FIELD"),
    ({"api": "crystal-ball"}, "api", "UNKNOWN_API"),
]


async def test_report_usage_rejects_malformed_event_naming_the_field(q, subtests):
    await q.grant(quantity=10)
    for i, (fields, field, reason) in enumerate(MALFORMED_EVENTS):
        with subtests.test(field=field, reason=reason, case=i):
            values = {"event_id": f"bad-{i}", "account_id": ACCOUNT, **fields}
            request = q.usage(values.pop("event_id"), values.pop("account_id"), **values)

            await expect_error(q.report_request(request), INVALID, reason, field)

            # Nothing was written: the package is untouched and the event id is still free.
            assert (await q.list_packages()).packages[0].used_quantity == 0
            if request.event_id:
                await expect_error(
                    q.explain(request.event_id), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND"
                )


async def test_occur_time_within_clock_skew_tolerance_is_accepted(q):
    result = await q.report("e1", occur=START + timedelta(minutes=4))
    assert result.pay_per_use_quantity == 1


async def test_failed_report_does_not_claim_the_event_id(q):
    package = await q.grant(quantity=10)
    await expect_error(q.report("e1", quantity=-5), INVALID, "INVALID_FIELD", "quantity")

    result = await q.report("e1", quantity=3)

    assert not result.duplicate
    assert (await q.get(package.package_id)).used_quantity == 3


MALFORMED_PACKAGES = [
    ({"account_id": ""}, "package.account_id", "INVALID_FIELD"),
    ({"region": "mars-north-1"}, "package.region", "UNKNOWN_REGION"),
    ({"api": "crystal-ball"}, "package.api", "UNKNOWN_API"),
    ({"quantity": 0}, "package.total_quantity", "INVALID_FIELD"),
    ({"source": quota_pb2.PACKAGE_SOURCE_UNSPECIFIED}, "package.source", "INVALID_FIELD"),
    ({"expire": None}, "package.expire_time", "INVALID_FIELD"),
    (
        {"effective": "2024-06-01T00:00:00Z", "expire": "2024-05-31T23:59:59Z"},
        "package.expire_time",
        "INVALID_FIELD",
    ),
    ({"project": "not a project!"}, "package.enterprise_project_id", "INVALID_FIELD"),
]


async def test_grant_package_rejects_malformed_package_and_writes_nothing(q, subtests):
    for i, (fields, field, reason) in enumerate(MALFORMED_PACKAGES):
        with subtests.test(field=field, reason=reason, case=i):
            values = {"account_id": ACCOUNT, "quantity": 10, **fields}
            await expect_error(q.grant(request_id=f"order-{i}", **values), INVALID, reason, field)
            assert list((await q.list_packages(account_id="")).packages) == []

    # The request id was not claimed by the failed attempt: corrected content goes through.
    package = await q.grant(request_id="order-0")
    assert await q.package_ids() == [package.package_id]


async def test_grant_package_rejects_malformed_timestamp(q):
    package = q.package()
    package.effective_time.CopyFrom(timestamp_pb2.Timestamp(seconds=0, nanos=-5))

    await expect_error(q.grant_package(package), INVALID, "INVALID_FIELD", "package.effective_time")


async def test_region_not_served_by_this_process(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_regions=REGION) as q:
        precondition = grpc.StatusCode.FAILED_PRECONDITION

        await expect_error(q.grant(region=OTHER_REGION), precondition, "REGION_NOT_SERVED")
        await expect_error(q.report("e1", region=OTHER_REGION), precondition, "REGION_NOT_SERVED")
        await expect_error(q.enable(region=OTHER_REGION), precondition, "REGION_NOT_SERVED")
        await expect_error(q.summary(region=OTHER_REGION), precondition, "REGION_NOT_SERVED")

        # The served region works, and the refused calls left nothing behind.
        assert (await q.report("e2")).pay_per_use_quantity == 1
        assert list((await q.list_packages()).packages) == []
        await expect_error(q.explain("e1"), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND")


async def test_listing_packages_of_a_region_not_served_is_refused(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_regions=REGION) as q:
        await expect_error(
            q.list_packages(region=OTHER_REGION),
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_NOT_SERVED",
        )


async def test_event_id_reused_with_other_content_is_rejected_and_original_kept(q):
    package = await q.grant(quantity=10)
    original = await q.report("e1", quantity=2)

    await expect_error(q.report("e1", quantity=3), INVALID, "EVENT_ID_REUSED", "event_id")
    await expect_error(
        q.report("e1", quantity=2, http_status=500), INVALID, "EVENT_ID_REUSED", "event_id"
    )

    assert (await q.get(package.package_id)).used_quantity == 2
    replay = await q.report("e1", quantity=2)
    assert replay.duplicate
    assert list(replay.deductions) == list(original.deductions)
    explanation = await q.explain("e1")
    assert [c.deducted_quantity for c in explanation.candidates] == [2]


async def test_request_id_reused_for_other_grant_is_rejected(q):
    first = await q.grant(quantity=10, request_id="order-1")

    await expect_error(
        q.grant(quantity=20, request_id="order-1"), INVALID, "REQUEST_ID_REUSED", "request_id"
    )

    assert await q.package_ids() == [first.package_id]
    assert (await q.get(first.package_id)).total_quantity == 10


async def test_unknown_package_is_not_found_for_operators(q):
    not_found = grpc.StatusCode.NOT_FOUND
    await expect_error(q.get("pkg-missing"), not_found, "PACKAGE_NOT_FOUND")
    await expect_error(q.renew("pkg-missing", add=5), not_found, "PACKAGE_NOT_FOUND")
    await expect_error(q.revoke("pkg-missing"), not_found, "PACKAGE_NOT_FOUND")


async def test_renewing_or_revoking_a_revoked_package_is_an_invalid_transition(q):
    package = await q.grant(quantity=10)
    await q.revoke(package.package_id)
    precondition = grpc.StatusCode.FAILED_PRECONDITION

    await expect_error(
        q.renew(package.package_id, add=10, expire="2025-12-31T23:59:59Z"),
        precondition,
        "INVALID_STATE_TRANSITION",
    )
    await expect_error(q.revoke(package.package_id), precondition, "INVALID_STATE_TRANSITION")

    after = await q.get(package.package_id)
    assert (after.state, after.total_quantity) == (quota_pb2.PACKAGE_STATE_REVOKED, 10)


async def test_renewal_must_extend_or_add(q, subtests):
    package = await q.grant(quantity=10)
    renewals = [
        ({"expire": "2024-06-30T23:59:59Z"}, "expire_time"),  # earlier than the current expiry
        ({"add": -1}, "add_quantity"),
        ({}, "expire_time"),  # neither extends nor adds
    ]
    for renewal, field in renewals:
        with subtests.test(renewal=renewal):
            await expect_error(
                q.renew(package.package_id, **renewal), INVALID, "INVALID_FIELD", field
            )
            after = await q.get(package.package_id)
            assert (after.total_quantity, after.expire_time) == (10, package.expire_time)


async def test_list_requests_validate_their_arguments(q):
    await expect_error(q.list_packages(page_size=-1), INVALID, "INVALID_FIELD", "page_size")
    await expect_error(q.list_packages(states=[42]), INVALID, "INVALID_FIELD", "states")
    await expect_error(q.list_packages(api="crystal-ball"), INVALID, "UNKNOWN_API", "api")
    await expect_error(q.summary(region="mars-north-1"), INVALID, "UNKNOWN_REGION", "region")
    await expect_error(q.summary(""), INVALID, "INVALID_FIELD", "account_id")
    await expect_error(q.check(quantity=-1), INVALID, "INVALID_FIELD", "quantity")
    await expect_error(q.check(api=""), INVALID, "INVALID_FIELD", "api")
