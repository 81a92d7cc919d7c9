"""Near misses through the service (docs/design/deduction-order.md, "Explaining a deduction"):
ExplainUsage of a pay-per-use event lists the account's packages that did not pay and why,
most likely cause first; a call paid in full has none; a region-limited token sees none of the
regions it may not see."""

from __future__ import annotations

from datetime import timedelta

import pytest
from allot.quota.v1 import quota_pb2

from tests.support.quota import (
    ACCOUNT,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    REGION,
    QuotaCalls,
)

MISS = quota_pb2.NearMissReason
PROJECT, OTHER_PROJECT = "proj-a", "proj-b"


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


def misses(explanation) -> list[tuple[str, int]]:
    return [(m.package_id, m.reason) for m in explanation.near_misses]


async def test_pay_per_use_event_lists_the_packages_that_did_not_pay_most_likely_first(q):
    # The clock stands at 2024-01-01T00:00:00Z; the call happens then, in REGION, of API, for
    # PROJECT. None of these packages can pay for it.
    used_up = await q.grant(quantity=1)
    await q.report("e0", project=PROJECT)  # empties it
    other_api = await q.grant(api=OTHER_API)
    other_region = await q.grant(region=OTHER_REGION)
    other_project = await q.grant(project=OTHER_PROJECT)
    starts_later = await q.grant(effective="2024-03-01T00:00:00Z")
    starts_tomorrow = await q.grant(effective="2024-01-02T00:00:00Z")
    expired_yesterday = await q.grant(
        effective="2023-06-01T00:00:00Z", expire="2023-12-31T00:00:00Z"
    )
    expired_long_ago = await q.grant(
        effective="2023-06-01T00:00:00Z", expire="2023-12-20T00:00:00Z"
    )
    revoked = await q.grant()
    await q.revoke(revoked.package_id)
    # Never listed: another API in another region, another account's, one expired long before
    # the 31 days an explanation looks back.
    await q.grant(region=OTHER_REGION, api=OTHER_API)
    await q.grant(OTHER_ACCOUNT)
    await q.grant(effective="2023-01-01T00:00:00Z", expire="2023-06-30T00:00:00Z")

    charged = await q.report("e1", quantity=3, project=PROJECT)
    assert charged.pay_per_use_quantity == 3

    explanation = await q.explain("e1")
    assert misses(explanation) == [
        (other_project.package_id, MISS.NEAR_MISS_REASON_OTHER_PROJECT),
        (starts_tomorrow.package_id, MISS.NEAR_MISS_REASON_NOT_YET_EFFECTIVE),
        (starts_later.package_id, MISS.NEAR_MISS_REASON_NOT_YET_EFFECTIVE),
        (expired_yesterday.package_id, MISS.NEAR_MISS_REASON_EXPIRED),
        (expired_long_ago.package_id, MISS.NEAR_MISS_REASON_EXPIRED),
        (used_up.package_id, MISS.NEAR_MISS_REASON_EXHAUSTED),
        (revoked.package_id, MISS.NEAR_MISS_REASON_REVOKED),
        (other_api.package_id, MISS.NEAR_MISS_REASON_OTHER_API),
        (other_region.package_id, MISS.NEAR_MISS_REASON_OTHER_REGION),
    ]
    first = explanation.near_misses[0]
    assert (first.region, first.api, first.enterprise_project_id) == (
        REGION,
        "passport",
        OTHER_PROJECT,
    )
    other = explanation.near_misses[-2]
    assert (other.region, other.api) == (REGION, OTHER_API)

    # The account's own token sees the same; one limited to REGION does not see OTHER_REGION.
    own = await q.explain("e1", q.account(ACCOUNT, read_only=True))
    assert misses(own) == misses(explanation)
    regional = q.tokens.md(q.tokens.account(ACCOUNT, read_only=True, regions=[REGION]))
    assert misses(await q.explain("e1", regional)) == misses(explanation)[:-1]


async def test_a_call_paid_by_a_package_has_no_near_misses(q):
    await q.grant(quantity=5)
    await q.grant(api=OTHER_API)
    await q.grant(project=OTHER_PROJECT)
    paid = await q.report("e1", quantity=2)
    assert paid.pay_per_use_quantity == 0
    assert list((await q.explain("e1")).near_misses) == []


async def test_near_misses_are_those_known_when_the_event_was_recorded(q):
    await q.report("e1")  # nothing held: pay-per-use, and no near miss
    # A package for another API granted after the event (in force at the call on paper) does
    # not explain it.
    await q.advance(timedelta(seconds=1))
    await q.grant(api=OTHER_API, effective="2023-12-01T00:00:00Z")
    explanation = await q.explain("e1")
    assert explanation.pay_per_use_quantity == 1
    assert list(explanation.near_misses) == []
