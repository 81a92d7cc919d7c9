"""Per-project and per-user reporting in quota, through a real server: GetUsageStats grouped
by enterprise project or IAM user and filtered by either, GetQuotaSummary and ListPackages
kept to the packages one project may use (designated for it, or for every project).
"""

from __future__ import annotations

from datetime import UTC

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2

from tests.support.calls import expect_error, ts
from tests.support.quota import ACCOUNT, API, OTHER_API, REGION, START, QuotaCalls

HOUR = quota_pb2.STATS_GRANULARITY_HOUR
BY_PROJECT = quota_pb2.USAGE_GROUP_BY_PROJECT
BY_USER = quota_pb2.USAGE_GROUP_BY_USER
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (event id, minute after START, quantity, project, user, http status)
EVENTS = [
    ("a1", 1, 3, "p-a", "alice", 200),
    ("a2", 2, 2, "p-a", "bob", 200),
    ("b1", 3, 4, "p-b", "alice", 200),
    ("b2", 4, 1, "p-b", "alice", 500),
    ("d1", 5, 5, "", "", 200),  # no project: the default project "0"; no user
    ("a3", 70, 6, "p-a", "alice", 200),  # the next hour
]


@pytest.fixture
async def calls(quota) -> QuotaCalls:
    q = QuotaCalls(quota)
    # 4 calls for p-a only, 3 for every project: p-a's calls use its own package first.
    await q.grant(quantity=4, project="p-a", effective=START)
    await q.grant(quantity=3, effective=START)
    for event_id, minute, quantity, project, user, status in EVENTS:
        occur = START.replace(hour=minute // 60, minute=minute % 60)
        await q.set_time(occur)  # usage may not lie in the future
        await q.report(
            event_id,
            quantity=quantity,
            project=project,
            user_id=user,
            http_status=status,
            occur=occur,
        )
    await q.set_time(START.replace(hour=3))
    return q


def stats(q: QuotaCalls, **fields):
    request = quota_service_pb2.GetUsageStatsRequest(
        **{"account_id": ACCOUNT, "region": REGION, "api": API, "granularity": HOUR, **fields}
    )
    request.start_time.CopyFrom(ts(START))
    request.end_time.CopyFrom(ts(START.replace(hour=3)))
    return q.stub.GetUsageStats(request, metadata=q.admin)


async def rows(q: QuotaCalls, **fields) -> list[tuple]:
    """(hour, project, user, successful, failed, package, pay-per-use) per bucket."""
    response = await stats(q, **fields)
    return [
        (
            b.start_time.ToDatetime(tzinfo=UTC).hour,
            b.enterprise_project_id,
            b.user_id,
            b.successful_calls,
            b.failed_calls,
            b.package_quantity,
            b.pay_per_use_quantity,
        )
        for b in response.buckets
    ]


async def test_usage_grouped_by_project_adds_up_to_the_ungrouped_buckets(calls):
    # a1 takes 3 of p-a's 4, a2 the last one and 1 of the shared 3; b1 the other 2 shared
    # and 2 pay-per-use; d1 is all pay-per-use; a3 too.
    assert await rows(calls, group_by=BY_PROJECT) == [
        (0, "0", "", 5, 0, 0, 5),
        (0, "p-a", "", 5, 0, 5, 0),
        (0, "p-b", "", 4, 1, 2, 2),
        (1, "p-a", "", 6, 0, 0, 6),
    ]
    assert await rows(calls) == [(0, "", "", 14, 1, 7, 7), (1, "", "", 6, 0, 0, 6)]


async def test_usage_grouped_by_user(calls):
    assert await rows(calls, group_by=BY_USER) == [
        (0, "", "", 5, 0, 0, 5),  # reported without a user
        (0, "", "alice", 7, 1, 5, 2),
        (0, "", "bob", 2, 0, 2, 0),
        (1, "", "alice", 6, 0, 0, 6),
    ]


async def test_usage_filtered_by_project_and_by_user(calls):
    assert await rows(calls, enterprise_project_id="p-a") == [
        (0, "", "", 5, 0, 5, 0),
        (1, "", "", 6, 0, 0, 6),
    ]
    assert await rows(calls, user_id="alice", group_by=BY_PROJECT) == [
        (0, "p-a", "", 3, 0, 3, 0),
        (0, "p-b", "", 4, 1, 2, 2),
        (1, "p-a", "", 6, 0, 0, 6),
    ]
    assert await rows(calls, enterprise_project_id="p-b", user_id="bob") == []
    # Another API's usage is not in these buckets.
    assert await rows(calls, api=OTHER_API, group_by=BY_USER) == []


async def test_reporting_filters_are_checked(calls):
    for fields, field in (
        ({"group_by": 3}, "group_by"),
        ({"enterprise_project_id": "no spaces"}, "enterprise_project_id"),
        ({"user_id": "x" * 129}, "user_id"),
    ):
        await expect_error(stats(calls, **fields), INVALID, "INVALID_FIELD", field)
    await expect_error(
        calls.stub.GetQuotaSummary(
            quota_service_pb2.GetQuotaSummaryRequest(
                account_id=ACCOUNT, enterprise_project_id="a/b"
            ),
            metadata=calls.admin,
        ),
        INVALID,
        "INVALID_FIELD",
        "enterprise_project_id",
    )
    await expect_error(
        calls.list_packages(enterprise_project_id="é"),
        INVALID,
        "INVALID_FIELD",
        "enterprise_project_id",
    )


async def summary(q: QuotaCalls, project: str) -> list[tuple]:
    response = await q.stub.GetQuotaSummary(
        quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT, enterprise_project_id=project),
        metadata=q.admin,
    )
    return [
        (i.api, i.total_quantity, i.used_quantity, i.remaining_quantity, i.active_package_count)
        for i in response.items
    ]


async def test_summary_and_list_keep_to_what_a_project_may_use(calls):
    p_b_only = await calls.grant(quantity=50, project="p-b", effective=START)
    all_projects = {p.package_id for p in (await calls.list_packages()).packages}
    shared = {
        p.package_id for p in (await calls.list_packages()).packages if not p.enterprise_project_id
    }
    p_a_only = all_projects - shared - {p_b_only.package_id}

    # Every package: 4 (p-a, used up) + 3 (shared, used up) + 50 (p-b).
    assert await summary(calls, "") == [(API, 57, 7, 50, 1)]
    assert await summary(calls, "p-a") == [(API, 7, 7, 0, 0)]
    assert await summary(calls, "p-b") == [(API, 53, 3, 50, 1)]
    assert await summary(calls, "p-z") == [(API, 3, 3, 0, 0)]  # only the shared package

    async def listed(project: str) -> set[str]:
        response = await calls.list_packages(enterprise_project_id=project)
        return {p.package_id for p in response.packages}

    assert await listed("p-a") == p_a_only | shared
    assert await listed("p-b") == {p_b_only.package_id} | shared
    assert await listed("p-z") == shared
    # A page token belongs to its filter.
    first = await calls.list_packages(enterprise_project_id="p-b", page_size=1)
    assert first.next_page_token
    await expect_error(
        calls.list_packages(
            enterprise_project_id="p-a", page_size=1, page_token=first.next_page_token
        ),
        INVALID,
        field="page_token",
    )
