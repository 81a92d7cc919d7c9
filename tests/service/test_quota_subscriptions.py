"""API subscriptions and admission (docs/design/deduction-order.md, "Admission"): CheckQuota answers
as data, and usage that happened is recorded whatever the admission state."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2

from tests.support.calls import expect_error
from tests.support.quota import (
    API,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    REGION,
    QuotaCalls,
    deductions,
)

SUBSCRIBED = quota_pb2.API_SUBSCRIPTION_STATE_ACTIVE
CANCELLED = quota_pb2.API_SUBSCRIPTION_STATE_CANCELLED
NOT_SUBSCRIBED = quota_service_pb2.DENY_REASON_API_NOT_SUBSCRIBED
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


async def walk_subscriptions(q: QuotaCalls, **request) -> list[list[tuple[str, str, int]]]:
    """Every page of ListApiSubscriptions, as (region, api, state) rows."""
    pages, token = [], ""
    while True:
        page = await q.subscriptions(page_token=token, **request)
        pages.append([(s.region, s.api, s.state) for s in page.api_subscriptions])
        token = page.next_page_token
        if not token:
            return pages


async def test_enable_disable_and_list_subscriptions_page_by_page(q):
    enabled = await q.enable(api=API, region=REGION)
    await q.enable(api=OTHER_API, region=REGION)
    await q.enable(api=API, region=OTHER_REGION)
    await q.enable(OTHER_ACCOUNT, api=API, region=REGION)
    disabled = await q.disable(api=OTHER_API, region=REGION)

    assert (enabled.state, enabled.account_id, enabled.create_time.seconds > 0) == (
        SUBSCRIBED,
        "acct-1",
        True,
    )
    assert disabled.state == CANCELLED
    assert await walk_subscriptions(q, page_size=1) == [
        [(REGION, OTHER_API, CANCELLED)],
        [(REGION, API, SUBSCRIBED)],
        [(OTHER_REGION, API, SUBSCRIBED)],
    ]
    assert await walk_subscriptions(q, region=REGION) == [
        [(REGION, OTHER_API, CANCELLED), (REGION, API, SUBSCRIBED)]
    ]


async def test_subscription_page_token_must_come_from_the_same_query(q):
    await q.enable(api=API)
    await q.enable(api=OTHER_API)
    first = await q.subscriptions(region=REGION, page_size=1)

    await expect_error(
        q.subscriptions(page_token="not-a-token"), INVALID, "INVALID_FIELD", "page_token"
    )
    await expect_error(
        q.subscriptions(region=OTHER_REGION, page_token=first.next_page_token),
        INVALID,
        "INVALID_FIELD",
        "page_token",
    )
    rest = await q.subscriptions(region=REGION, page_size=1, page_token=first.next_page_token)
    assert [s.api for s in rest.api_subscriptions] == [API]


async def test_disabling_an_api_never_enabled_is_not_found(q):
    await expect_error(q.disable(), grpc.StatusCode.NOT_FOUND, "API_SUBSCRIPTION_NOT_FOUND")
    assert list((await q.subscriptions()).api_subscriptions) == []


async def test_check_quota_denies_an_api_not_subscribed(q):
    await q.grant(quantity=10)

    denied = await q.check(quantity=1)

    assert (denied.allowed, denied.deny_reason) == (False, NOT_SUBSCRIBED)
    await q.enable(api=OTHER_API)  # another API does not help
    assert (await q.check()).deny_reason == NOT_SUBSCRIBED
    await q.enable()
    await q.disable()
    assert (await q.check()).deny_reason == NOT_SUBSCRIBED


async def test_check_quota_admits_a_subscribed_api_and_reports_what_is_left(q):
    await q.enable()
    await q.grant(quantity=10)
    await q.report("e1", quantity=4)

    answers = {n: await q.check(quantity=n) for n in (0, 6, 7)}

    assert all(a.allowed for a in answers.values())
    assert {a.deny_reason for a in answers.values()} == {quota_service_pb2.DENY_REASON_UNSPECIFIED}
    assert {a.remaining_quantity for a in answers.values()} == {6}
    assert [answers[n].pay_per_use for n in (0, 6, 7)] == [False, False, True]
    # Checking changes nothing.
    assert (await q.summary()).items[0].remaining_quantity == 6


async def test_check_quota_without_packages_allows_pay_per_use(q):
    await q.enable()

    answer = await q.check(quantity=1)

    assert (answer.allowed, answer.remaining_quantity, answer.pay_per_use) == (True, 0, True)


async def test_check_quota_counts_project_packages_only_for_their_project(q):
    await q.enable()
    await q.grant(quantity=10)
    await q.grant(quantity=5, project="proj-1")

    assert (await q.check(project="proj-1")).remaining_quantity == 15
    assert (await q.check(project="proj-2")).remaining_quantity == 10
    assert (await q.check()).remaining_quantity == 10


async def test_concurrent_checks_each_get_the_answer_of_their_own_key(q):
    """Concurrent CheckQuota calls share statements (services/quota/README.md, "Admission"):
    each still gets its own account's, API's and project's answer, and a write acknowledged
    before a check is seen by it."""
    await q.enable()
    await q.grant(quantity=10)
    await q.grant(quantity=5, project="proj-1")
    await q.enable(OTHER_ACCOUNT)
    await q.grant(OTHER_ACCOUNT, quantity=3)
    calls = [
        *(q.check(project="proj-1") for _ in range(20)),
        *(q.check() for _ in range(20)),
        *(q.check(OTHER_ACCOUNT) for _ in range(20)),
        *(q.check(api=OTHER_API) for _ in range(20)),
    ]
    answers = await asyncio.gather(*calls)
    assert [a.remaining_quantity for a in answers] == [15] * 20 + [10] * 20 + [3] * 20 + [0] * 20
    assert [a.deny_reason for a in answers[60:]] == [NOT_SUBSCRIBED] * 20
    assert all(a.allowed for a in answers[:60])

    await q.report("e1", quantity=4)
    after = await asyncio.gather(*(q.check() for _ in range(10)))
    assert [a.remaining_quantity for a in after] == [6] * 10


async def test_usage_is_recorded_even_when_the_api_is_not_subscribed(q):
    package = await q.grant(quantity=10)
    assert not (await q.check()).allowed

    result = await q.report("e1", quantity=3)

    assert deductions(result) == [(package.package_id, 3)]
    assert (await q.explain("e1")).event_id == "e1"
    assert (await q.get(package.package_id)).used_quantity == 3
