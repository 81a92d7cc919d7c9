"""Package states follow the clock on every read; summaries count packages in force; renewal
and revocation change what pays (docs/design/deduction-order.md; `QuotaSummary`)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.support.calls import ts
from tests.support.quota import (
    ACTIVE,
    API,
    EXHAUSTED,
    EXPIRED,
    FREE,
    OTHER_API,
    PENDING,
    REGION,
    REVOKED,
    QuotaCalls,
    deductions,
)

STATES = (PENDING, ACTIVE, EXHAUSTED, EXPIRED, REVOKED)


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


async def assert_state(q: QuotaCalls, package_id: str, state: int) -> None:
    """GetPackage says `state`, and ListPackages' `states` filter agrees for every state."""
    assert (await q.get(package_id)).state == state
    for candidate in STATES:
        listed = package_id in await q.package_ids(states=[candidate])
        assert listed is (candidate == state), f"states=[{candidate}] listed={listed}"


async def test_package_state_follows_the_clock(q):
    package = await q.grant(
        quantity=2, effective="2024-01-11T00:00:00Z", expire="2024-01-31T23:59:59Z"
    )
    pid = package.package_id
    await assert_state(q, pid, PENDING)
    assert (await q.report("early")).pay_per_use_quantity == 1  # not yet effective: no pay

    await q.advance(timedelta(days=10))  # exactly the effective instant
    await assert_state(q, pid, ACTIVE)

    await q.report("use", quantity=2)
    await assert_state(q, pid, EXHAUSTED)

    await q.set_time("2024-01-31T23:59:59Z")  # the last covered second
    await assert_state(q, pid, EXHAUSTED)
    await q.advance(timedelta(seconds=1))
    await assert_state(q, pid, EXPIRED)


async def test_active_package_expires_after_its_last_second_and_forfeits_the_rest(q):
    package = await q.grant(quantity=10, expire="2024-01-31T23:59:59Z")
    await q.set_time("2024-01-31T23:59:59Z")
    assert deductions(await q.report("last")) == [(package.package_id, 1)]

    await q.advance(timedelta(seconds=1))
    after = await q.report("after")

    assert (deductions(after), after.pay_per_use_quantity, after.remaining_quantity) == ([], 1, 0)
    await assert_state(q, package.package_id, EXPIRED)
    assert list((await q.summary()).items) == []
    assert (await q.check()).remaining_quantity == 0


async def test_quota_summary_counts_only_packages_in_force(q):
    await q.grant(quantity=100, effective="2024-01-05T00:00:00Z")  # pending
    active = await q.grant(quantity=10)
    exhausted = await q.grant(quantity=5, source=FREE)
    await q.grant(quantity=7, effective="2023-01-01T00:00:00Z", expire="2023-12-31T23:59:59Z")
    revoked = await q.grant(quantity=20)
    await q.revoke(revoked.package_id)
    await q.grant(quantity=4, api=OTHER_API)
    await q.report("e1", quantity=8)  # 5 from the free package, then 3 from `active`
    assert (await q.get(exhausted.package_id)).state == EXHAUSTED
    assert (await q.get(active.package_id)).used_quantity == 3

    items = [
        (i.region, i.api, i.total_quantity, i.used_quantity, i.remaining_quantity)
        + (i.active_package_count,)
        for i in (await q.summary()).items
    ]

    assert items == [(REGION, OTHER_API, 4, 0, 4, 1), (REGION, API, 15, 8, 7, 1)]
    only_api = (await q.summary(api=API, region=REGION)).items
    assert [(i.api, i.total_quantity) for i in only_api] == [(API, 15)]

    await q.set_time("2024-01-05T00:00:00Z")  # the pending package comes into force
    (item,) = (await q.summary(api=API)).items
    assert (item.total_quantity, item.remaining_quantity, item.active_package_count) == (
        115,
        107,
        2,
    )


async def test_renew_extends_expiry_and_adds_quantity(q):
    package = await q.grant(quantity=10, expire="2024-01-31T23:59:59Z")
    await q.report("e1", quantity=4)

    renewed = await q.renew(package.package_id, expire="2025-01-31T23:59:59Z", add=10)

    assert (renewed.total_quantity, renewed.used_quantity, renewed.remaining_quantity) == (
        20,
        4,
        16,
    )
    assert renewed.expire_time == ts("2025-01-31T23:59:59Z")
    assert await q.get(package.package_id) == renewed
    await q.set_time("2024-06-01T00:00:00Z")  # past the old expiry
    assert deductions(await q.report("e2")) == [(package.package_id, 1)]
    await assert_state(q, package.package_id, ACTIVE)


async def test_renewing_an_exhausted_package_makes_it_active_again(q):
    package = await q.grant(quantity=2)
    await q.report("e1", quantity=2)
    await assert_state(q, package.package_id, EXHAUSTED)

    renewed = await q.renew(package.package_id, add=5)

    assert (renewed.state, renewed.remaining_quantity) == (ACTIVE, 5)
    assert (await q.check(quantity=5)).pay_per_use is False


async def test_renewing_an_expired_package_forfeits_its_old_remainder(q):
    package = await q.grant(quantity=10, expire="2024-01-31T23:59:59Z")
    await q.report("e1", quantity=3)
    await q.set_time("2024-02-05T00:00:00Z")
    await assert_state(q, package.package_id, EXPIRED)

    renewed = await q.renew(package.package_id, expire="2025-01-31T23:59:59Z", add=10)

    assert (renewed.state, renewed.total_quantity, renewed.remaining_quantity) == (ACTIVE, 20, 10)


async def test_revoked_package_no_longer_pays(q):
    revoked = await q.grant(quantity=10, source=FREE)
    kept = await q.grant(quantity=10)
    await q.report("before", quantity=2)
    await q.advance(timedelta(hours=1))

    result = await q.revoke(revoked.package_id, reason="order cancelled")

    assert (result.state, result.revoke_reason) == (REVOKED, "order cancelled")
    assert result.revoke_time == ts("2024-01-01T01:00:00Z")
    await assert_state(q, revoked.package_id, REVOKED)
    after = await q.report("after", quantity=3)
    assert deductions(after) == [(kept.package_id, 3)]
    assert after.remaining_quantity == 7
    (item,) = (await q.summary()).items
    assert (item.total_quantity, item.remaining_quantity, item.active_package_count) == (10, 7, 1)
    # A late report of a call made before the revocation cannot draw on it either.
    late = await q.report("late", occur="2024-01-01T00:30:00Z")
    assert deductions(late) == [(kept.package_id, 1)]
