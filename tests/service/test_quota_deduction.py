"""Which packages pay for a call, end to end through the service (docs/design/deduction-order.md),
and how ExplainUsage says why."""

from __future__ import annotations

from datetime import timedelta

import pytest
from allot.quota.v1 import quota_pb2

from tests.support.quota import (
    ACCOUNT,
    EXHAUSTED,
    EXPIRED,
    FREE,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    PROMOTION,
    START,
    SUBSCRIPTION,
    QuotaCalls,
    deductions,
    quota_server,
)

RULE = quota_pb2.DecisiveRule
REASON = quota_pb2.IneligibleReason


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


def candidates(explanation) -> list[tuple]:
    """(package_id, rank, eligible, ineligible_reason, deducted_quantity) per candidate."""
    return [
        (c.package_id, c.rank, c.eligible, c.ineligible_reason, c.deducted_quantity)
        for c in explanation.candidates
    ]


async def test_one_year_package_covers_its_last_second_in_the_billing_time_zone(q):
    # Bought 2023-04-19 14:25:10 (UTC+08:00); runs until 2024-04-19 23:59:59 (UTC+08:00).
    package = await q.grant(
        quantity=100, effective="2023-04-19T14:25:10+08:00", expire="2024-04-19T15:59:59Z"
    )

    await q.set_time("2024-04-19T23:59:59+08:00")
    assert (await q.get(package.package_id)).state == quota_pb2.PACKAGE_STATE_ACTIVE
    await q.set_time("2024-04-20T00:00:00+08:00")
    assert (await q.get(package.package_id)).state == EXPIRED

    last_second = await q.report("last-second", occur="2024-04-19T23:59:59+08:00")
    next_day = await q.report("next-day", occur="2024-04-20T00:00:00+08:00")

    assert (deductions(last_second), last_second.pay_per_use_quantity) == (
        [(package.package_id, 1)],
        0,
    )
    assert (deductions(next_day), next_day.pay_per_use_quantity) == ([], 1)
    assert (await q.explain("last-second")).decisive_rule == RULE.DECISIVE_RULE_ONLY_CANDIDATE
    assert (await q.get(package.package_id)).used_quantity == 1


async def test_call_past_a_100k_package_is_exactly_one_pay_per_use(q):
    package = await q.grant(quantity=100_000)

    bulk = await q.report("bulk", quantity=99_999)
    last, over = (await q.batch([q.usage("last"), q.usage("over")])).responses

    assert (bulk.pay_per_use_quantity, bulk.remaining_quantity) == (0, 1)
    assert (deductions(last), last.pay_per_use_quantity) == ([(package.package_id, 1)], 0)
    assert (deductions(over), over.pay_per_use_quantity) == ([], 1)
    after = await q.get(package.package_id)
    assert (after.state, after.used_quantity, after.remaining_quantity) == (EXHAUSTED, 100_000, 0)


async def test_only_2xx_calls_are_billable(q, subtests):
    package = await q.grant(quantity=100)
    used = 0
    for status in (199, 200, 204, 299, 302, 404, 429, 500, 503):
        with subtests.test(http_status=status):
            billable = 200 <= status <= 299
            result = await q.report(f"call-{status}", quantity=2, http_status=status)

            assert result.billable is billable
            assert deductions(result) == ([(package.package_id, 2)] if billable else [])
            assert result.pay_per_use_quantity == 0
            used += 2 if billable else 0
            assert (await q.get(package.package_id)).used_quantity == used
            if not billable:
                explanation = await q.explain(f"call-{status}")
                assert explanation.decisive_rule == RULE.DECISIVE_RULE_NOT_BILLABLE
                assert not explanation.billable


async def test_usage_touches_only_its_own_account_region_and_api(q):
    others = [
        await q.grant(OTHER_ACCOUNT),
        await q.grant(region=OTHER_REGION),
        await q.grant(api=OTHER_API),
    ]

    result = await q.report("e1", quantity=3)

    assert (deductions(result), result.pay_per_use_quantity) == ([], 3)
    assert (await q.explain("e1")).decisive_rule == RULE.DECISIVE_RULE_NO_CANDIDATE
    for package in others:
        assert (await q.get(package.package_id)).used_quantity == 0


async def test_free_before_promotion_before_subscription(q):
    # The purchase is the oldest package, so only the source can put it last.
    subscription = await q.grant(quantity=2, source=SUBSCRIPTION)
    await q.advance(timedelta(minutes=1))
    promotion = await q.grant(quantity=2, source=PROMOTION)
    await q.advance(timedelta(minutes=1))
    free = await q.grant(quantity=2, source=FREE)

    result = await q.report("e1", quantity=5)

    assert deductions(result) == [
        (free.package_id, 2),
        (promotion.package_id, 2),
        (subscription.package_id, 1),
    ]
    explanation = await q.explain("e1")
    assert explanation.decisive_rule == RULE.DECISIVE_RULE_SOURCE
    assert candidates(explanation) == [
        (free.package_id, 1, True, 0, 2),
        (promotion.package_id, 2, True, 0, 2),
        (subscription.package_id, 3, True, 0, 1),
    ]


async def test_project_packages_before_all_project_packages(q):
    shared = await q.grant(quantity=5, source=FREE)  # would win on source alone
    designated = await q.grant(quantity=5, source=SUBSCRIPTION, project="proj-1")

    own_project = await q.report("p1", quantity=6, project="proj-1")
    other_project = await q.report("p2", quantity=1, project="proj-2")
    no_project = await q.report("p0", quantity=1)

    assert deductions(own_project) == [(designated.package_id, 5), (shared.package_id, 1)]
    assert (await q.explain("p1")).decisive_rule == RULE.DECISIVE_RULE_PROJECT_SCOPE
    assert deductions(other_project) == [(shared.package_id, 1)]
    assert deductions(no_project) == [(shared.package_id, 1)]
    explanation = await q.explain("p2")
    assert explanation.enterprise_project_id == "proj-2"
    assert candidates(explanation) == [
        (shared.package_id, 1, True, 0, 1),
        (designated.package_id, 0, False, REASON.INELIGIBLE_REASON_OTHER_PROJECT, 0),
    ]


async def test_explain_usage_ranks_eligible_packages_and_gives_reasons_for_the_rest(q):
    exhausted = await q.grant(quantity=1)
    await q.report("e0")
    older = await q.grant(effective="2023-12-01T00:00:00Z")
    newer = await q.grant()
    pending = await q.grant(effective="2024-02-01T00:00:00Z")

    await q.report("e1", quantity=2)

    explanation = await q.explain("e1")
    assert (explanation.policy, explanation.billable) == ("standard", True)
    assert (explanation.account_id, explanation.pay_per_use_quantity) == (ACCOUNT, 0)
    assert explanation.decisive_rule == RULE.DECISIVE_RULE_EFFECTIVE_TIME
    ineligible = sorted(
        [
            (exhausted.package_id, 0, False, REASON.INELIGIBLE_REASON_EXHAUSTED, 0),
            (pending.package_id, 0, False, REASON.INELIGIBLE_REASON_NOT_YET_EFFECTIVE, 0),
        ]
    )
    assert candidates(explanation) == [
        (older.package_id, 1, True, 0, 2),
        (newer.package_id, 2, True, 0, 0),
        *ineligible,
    ]


async def test_earlier_expiry_breaks_a_tie_on_effective_time(q):
    later = await q.grant(expire="2024-12-31T23:59:59Z")
    sooner = await q.grant(expire="2024-06-30T23:59:59Z")

    result = await q.report("e1")

    assert deductions(result) == [(sooner.package_id, 1)]
    explanation = await q.explain("e1")
    assert explanation.decisive_rule == RULE.DECISIVE_RULE_EXPIRE_TIME
    assert [c.package_id for c in explanation.candidates] == [sooner.package_id, later.package_id]


async def test_expiring_first_policy_uses_the_package_that_ends_first(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, deduction_policy="expiring_first") as q:
        older = await q.grant(effective="2023-12-01T00:00:00Z", expire="2024-12-31T23:59:59Z")
        ending = await q.grant(expire="2024-03-31T23:59:59Z")

        result = await q.report("e1")

        assert deductions(result) == [(ending.package_id, 1)]
        explanation = await q.explain("e1")
        assert (explanation.policy, explanation.decisive_rule) == (
            "expiring_first",
            RULE.DECISIVE_RULE_EXPIRE_TIME,
        )
        assert (await q.get(older.package_id)).used_quantity == 0


async def test_late_report_is_paid_by_the_package_valid_at_occur_time(q):
    ended = await q.grant(effective="2023-01-01T00:00:00Z", expire="2024-01-31T23:59:59Z")
    current = await q.grant(source=FREE, effective="2024-02-01T00:00:00Z")
    await q.set_time("2024-02-10T00:00:00Z")

    late = await q.report("late", occur=START + timedelta(days=3))
    now = await q.report("now")

    assert deductions(late) == [(ended.package_id, 1)]
    assert deductions(now) == [(current.package_id, 1)]
    # The expired package's quantity is no longer part of the remaining quota.
    assert late.remaining_quantity == now.remaining_quantity + 1 == 10


async def test_explain_usage_lists_revoked_and_expired_packages_with_their_reason(q):
    revoked = await q.grant()
    await q.revoke(revoked.package_id)
    expired = await q.grant(effective="2023-01-01T00:00:00Z", expire="2023-12-31T23:59:59Z")

    await q.report("e1")

    reasons = {c.package_id: c.ineligible_reason for c in (await q.explain("e1")).candidates}
    assert reasons == {
        revoked.package_id: REASON.INELIGIBLE_REASON_REVOKED,
        expired.package_id: REASON.INELIGIBLE_REASON_EXPIRED,
    }


async def test_explanation_keeps_what_each_package_was_when_the_event_was_recorded(q):
    """The hot path reads only the packages that can still pay (docs/design/deduction-order.md,
    "Explaining a deduction"); ExplainUsage lists the others as they were at recording time,
    whatever happened to them afterwards."""
    used_up = await q.grant(quantity=1)
    await q.report("e0")
    used_up_then_revoked = await q.grant(quantity=1)
    await q.report("e1")
    paying = await q.grant(quantity=5)

    await q.report("e2")
    await q.advance(timedelta(seconds=1))
    await q.renew(used_up.package_id, add=10)  # has quantity again, after e2
    await q.revoke(used_up_then_revoked.package_id)
    later = await q.grant(quantity=5)  # did not exist for e2

    explanation = await q.explain("e2")
    assert candidates(explanation) == [
        (paying.package_id, 1, True, 0, 1),
        *sorted(
            [
                (used_up.package_id, 0, False, REASON.INELIGIBLE_REASON_EXHAUSTED, 0),
                (used_up_then_revoked.package_id, 0, False, REASON.INELIGIBLE_REASON_EXHAUSTED, 0),
            ]
        ),
    ]
    assert later.package_id not in {c.package_id for c in explanation.candidates}
    assert deductions(await q.report("e3")) == [(used_up.package_id, 1)]
