"""Quota's other events and its stream (docs/design/ownership-and-regions.md, "Events";
docs/design/usage-alerts.md; docs/design/time.md): `package_state_changed` for activation,
exhaustion, expiry and revocation, `package_expiring` once before expiry, `pay_per_use_recorded` for
every pay-per-use part, the clock-driven work that re-evaluates alerts, and `WatchEvents` history,
filters and live events."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from allot.quota.v1 import quota_service_pb2

from tests.support.calls import expect_error, ts
from tests.support.events import (
    ARMED,
    FIRED,
    PACKAGE_EXPIRING,
    PACKAGE_STATE_CHANGED,
    PAY_PER_USE_RECORDED,
    THRESHOLD_CROSSED,
    AlertCalls,
    crossings,
    events,
    payloads,
    state_changes,
)
from tests.support.quota import (
    ACCOUNT,
    ACTIVE,
    API,
    EXHAUSTED,
    EXPIRED,
    FREE,
    PENDING,
    REGION,
    REVOKED,
    START,
    QuotaCalls,
    quota_server,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
END_OF_JANUARY = "2024-01-31T23:59:59Z"


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


@pytest.fixture
def a(q) -> AlertCalls:
    return AlertCalls(q)


def kinds(items) -> list[str]:
    return [e.WhichOneof("payload") for e in items]


# --- package_state_changed ---------------------------------------------------------------


async def test_activation_is_announced_when_the_clock_reaches_it_and_rearms_alerts(q, a):
    rule = await a.create(api=API, quantity=50)  # no packages in force: armed
    package = await q.grant(quantity=40, effective="2024-01-05T00:00:00Z")
    assert package.state == PENDING
    assert await a.log.new() == []

    await q.set_time("2024-01-04T23:59:59Z")
    assert await a.log.new() == []

    await q.advance(timedelta(seconds=1))  # exactly the effective instant

    fresh = await a.log.new(at_least=2)
    assert state_changes(fresh) == [(package.package_id, PENDING, ACTIVE)]
    (changed,) = payloads(fresh, PACKAGE_STATE_CHANGED)
    assert (changed.package.total_quantity, changed.package.remaining_quantity) == (40, 40)
    # The total went from 0 to 40: the rule was evaluated at once, and 40 <= 50.
    assert crossings(fresh) == [(rule.alert_id, API, 40, 40)]
    assert await a.state(rule.alert_id) == FIRED

    await q.advance(timedelta(days=1))
    assert await a.log.new() == []


async def test_exhaustion_is_announced_once_by_the_call_that_empties_the_package(q, a):
    package = await q.grant(quantity=5)
    await q.report("e1", quantity=3)
    assert state_changes(await a.log.new()) == []

    await q.report("e2", quantity=4)  # 2 from the package, 2 pay-per-use

    fresh = await a.log.new(at_least=1, of_type=PACKAGE_STATE_CHANGED)
    assert state_changes(fresh) == [(package.package_id, ACTIVE, EXHAUSTED)]
    (changed,) = payloads(fresh, PACKAGE_STATE_CHANGED)
    assert (changed.package.used_quantity, changed.package.remaining_quantity) == (5, 0)
    await q.report("e3", quantity=2)
    await q.batch([q.usage("b1"), q.usage("b2")])
    assert state_changes(await a.log.new()) == []


async def test_exhaustion_inside_a_batch_is_announced_once(q, a):
    first = await q.grant(quantity=3, source=FREE)
    second = await q.grant(quantity=3)

    await q.batch([q.usage(f"b{i}", quantity=2) for i in range(4)])  # 8 calls: 6 + 2 per use

    fresh = await a.log.new(at_least=2, of_type=PACKAGE_STATE_CHANGED)
    assert sorted(state_changes(fresh)) == sorted(
        [(first.package_id, ACTIVE, EXHAUSTED), (second.package_id, ACTIVE, EXHAUSTED)]
    )


async def test_revocation_is_announced_and_rearms_alerts(q, a):
    kept = await q.grant(quantity=100, source=FREE)
    revoked = await q.grant(quantity=100)
    pending = await q.grant(quantity=10, effective="2024-03-01T00:00:00Z")
    rule = await a.create(api=API, percent=40)
    await q.report("e1", quantity=70)  # from the free package: 130 of 200 left
    assert await a.log.new_crossings() == []

    result = await q.revoke(revoked.package_id)

    assert result.state == REVOKED
    fresh = await a.log.new(at_least=2)
    assert state_changes(fresh) == [(revoked.package_id, ACTIVE, REVOKED)]
    # 30 of 100 left now: 30 % is at or below 40 %.
    assert crossings(fresh) == [(rule.alert_id, API, 30, 100)]
    assert kinds(fresh) == [PACKAGE_STATE_CHANGED, THRESHOLD_CROSSED]

    await q.revoke(pending.package_id)
    assert state_changes(await a.log.new(at_least=1)) == [(pending.package_id, PENDING, REVOKED)]
    await q.set_time("2024-03-02T00:00:00Z")  # a revoked package never activates
    assert await a.log.new() == []
    assert (await q.get(kept.package_id)).state == ACTIVE


async def test_expiry_shrinks_the_total_and_fires_a_rule_the_forfeit_crosses(q, a):
    used_first = await q.grant(quantity=100, source=FREE)
    expiring = await q.grant(quantity=100, expire=END_OF_JANUARY)
    rule = await a.create(api=API, percent=25)
    await q.report("e1", quantity=90)  # from the free package: 110 of 200 left (55 %)
    assert await a.log.new_crossings() == []

    await q.set_time("2024-02-01T00:00:00Z")

    fresh = await a.log.new(at_least=2)
    assert state_changes(fresh) == [(expiring.package_id, ACTIVE, EXPIRED)]
    (changed,) = payloads(fresh, PACKAGE_STATE_CHANGED)
    assert changed.package.state == EXPIRED
    # The unused 100 are forfeited: 10 of 100 left, 10 % <= 25 %.
    assert crossings(fresh) == [(rule.alert_id, API, 10, 100)]
    assert kinds(fresh) == [PACKAGE_STATE_CHANGED, THRESHOLD_CROSSED]
    assert await a.state(rule.alert_id) == FIRED
    (item,) = (await q.summary()).items
    assert (item.total_quantity, item.remaining_quantity) == (100, 10)
    assert (await q.get(used_first.package_id)).state == ACTIVE

    await q.advance(timedelta(days=30))
    assert await a.log.new() == []


async def test_expiry_of_an_exhausted_package_rearms_a_fired_rule(q, a):
    exhausted = await q.grant(quantity=100, source=FREE, expire=END_OF_JANUARY)
    other = await q.grant(quantity=100)
    rule = await a.create(api=API, percent=30)
    await q.report("e1", quantity=100)  # empties the free package
    await q.report("e2", quantity=40)  # 60 of 200 left: 30 %
    fresh = await a.log.new(at_least=1, of_type=THRESHOLD_CROSSED)
    assert crossings(fresh) == [(rule.alert_id, API, 60, 200)]
    assert state_changes(fresh) == [(exhausted.package_id, ACTIVE, EXHAUSTED)]
    await q.report("e3", quantity=5)  # 55 of 200 left

    # Past the window of expiry warnings: an exhausted package gets none.
    await q.set_time("2024-01-28T00:00:00Z")
    assert await a.log.new() == []

    await q.set_time("2024-02-01T00:00:00Z")

    # 55 of 100 left (55 %): re-armed without firing.
    fresh = await a.log.new(at_least=1)
    assert state_changes(fresh) == [(exhausted.package_id, EXHAUSTED, EXPIRED)]
    assert crossings(fresh) == []
    assert await a.state(rule.alert_id) == ARMED
    await q.report("e4", quantity=24)
    assert await a.log.new_crossings() == []
    await q.report("e5", quantity=1)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 30, 100)]
    assert (await q.get(other.package_id)).remaining_quantity == 30


# --- package_expiring --------------------------------------------------------------------


async def test_package_with_quantity_left_is_warned_once_seven_days_before_expiry(q, a):
    warned = await q.grant(quantity=10, expire=END_OF_JANUARY)
    used_up = await q.grant(quantity=2, source=FREE, expire=END_OF_JANUARY)
    await q.grant(quantity=10)  # expires at the end of the year
    await q.report("e1", quantity=3)  # 2 from the free package (exhausted), 1 from `warned`
    await a.log.new()

    await q.set_time("2024-01-24T23:59:59Z")  # 7 days and 1 second before expiry
    assert payloads(await a.log.new(), PACKAGE_EXPIRING) == []

    await q.advance(timedelta(seconds=1))

    fresh = await a.log.new(at_least=1, of_type=PACKAGE_EXPIRING)
    (expiring,) = payloads(fresh, PACKAGE_EXPIRING)
    assert expiring.days_left == 7
    assert expiring.package.package_id == warned.package_id
    assert (expiring.package.remaining_quantity, expiring.package.state) == (9, ACTIVE)
    assert expiring.package.expire_time == ts(END_OF_JANUARY)

    for step in (timedelta(seconds=1), timedelta(days=1), timedelta(days=5)):
        await q.advance(step)
        assert await a.log.new() == []
    await q.set_time("2024-02-01T00:00:00Z")
    fresh = await a.log.new(at_least=2)
    assert payloads(fresh, PACKAGE_EXPIRING) == []
    assert sorted(state_changes(fresh)) == sorted(
        [(warned.package_id, ACTIVE, EXPIRED), (used_up.package_id, EXHAUSTED, EXPIRED)]
    )
    await q.advance(timedelta(days=60))
    assert await a.log.new() == []
    assert len(payloads(a.log.seen, PACKAGE_EXPIRING)) == 1


async def test_renewal_to_a_new_expiry_gets_its_own_warning(q, a):
    package = await q.grant(quantity=10, expire=END_OF_JANUARY)
    await q.set_time("2024-01-25T00:00:00Z")
    assert len(payloads(await a.log.new(at_least=1), PACKAGE_EXPIRING)) == 1

    await q.renew(package.package_id, expire="2024-02-29T23:59:59Z")
    await q.set_time("2024-02-01T00:00:00Z")
    assert await a.log.new() == []  # not expired: renewed

    await q.set_time("2024-02-23T00:00:00Z")
    (again,) = payloads(await a.log.new(at_least=1), PACKAGE_EXPIRING)
    assert (again.package.package_id, again.days_left) == (package.package_id, 7)


# --- pay_per_use_recorded ----------------------------------------------------------------


async def test_pay_per_use_is_recorded_for_the_pay_per_use_part_only(q, a):
    await q.grant(quantity=5, source=FREE)
    responses = (
        await q.batch(
            [
                q.usage("package-only", quantity=3),
                q.usage("split", quantity=4),  # 2 from the package, 2 per use
                q.usage("failed", quantity=3, http_status=500),
                q.usage(
                    "late",
                    quantity=3,
                    project="proj-7",
                    user_id="user-9",
                    occur="2023-12-31T23:00:00Z",
                ),
                q.usage("bad-project", quantity=1, project="not a project!"),
                q.usage("", quantity=1),  # invalid: fails alone, records nothing
            ]
        )
    ).responses
    assert [r.pay_per_use_quantity for r in responses[:5]] == [0, 2, 0, 3, 1]
    assert responses[5].HasField("error")
    single = await q.report("single", quantity=2, user_id="user-2")
    await q.report("failed-single", quantity=7, http_status=404)
    assert single.pay_per_use_quantity == 2

    recorded = payloads(
        await a.log.new(at_least=4, of_type=PAY_PER_USE_RECORDED), PAY_PER_USE_RECORDED
    )

    rows = [
        (
            r.usage_event_id,
            r.quantity,
            r.account_id,
            r.user_id,
            r.region,
            r.api,
            r.enterprise_project_id,
            r.occur_time,
        )
        for r in recorded
    ]
    assert rows == [
        ("split", 2, ACCOUNT, "user-1", REGION, API, "0", ts(START)),
        ("late", 3, ACCOUNT, "user-9", REGION, API, "proj-7", ts("2023-12-31T23:00:00Z")),
        ("bad-project", 1, ACCOUNT, "user-1", REGION, API, "0", ts(START)),
        ("single", 2, ACCOUNT, "user-2", REGION, API, "0", ts(START)),
    ]

    # Replays change nothing and record nothing again.
    again = await q.batch([q.usage("split", quantity=4), q.usage("late-2", quantity=1)])
    assert again.responses[0].duplicate
    await q.report("single", quantity=2, user_id="user-2")
    recorded = payloads(
        await a.log.new(at_least=1, of_type=PAY_PER_USE_RECORDED), PAY_PER_USE_RECORDED
    )
    assert [(r.usage_event_id, r.quantity) for r in recorded] == [("late-2", 1)]


async def test_no_pay_per_use_event_while_packages_pay(q, a):
    await q.grant(quantity=10)
    await q.report("e1", quantity=4)
    await q.batch([q.usage(f"b{i}", quantity=2) for i in range(3)])  # exactly empties it
    await q.report("failed", quantity=5, http_status=429)
    assert payloads(await a.log.new(), PAY_PER_USE_RECORDED) == []


# --- WatchEvents -------------------------------------------------------------------------


async def _some_history(q: QuotaCalls) -> None:
    package = await q.grant(quantity=2, effective="2024-01-02T00:00:00Z")
    await q.report("ppu-1")  # before the package starts: pay-per-use
    await q.set_time("2024-01-02T00:00:00Z")  # activation
    await q.report("e1", quantity=3)  # exhausts it, 1 per use
    await q.revoke(package.package_id)


async def test_watch_events_from_zero_returns_the_history_in_order(q, a):
    await _some_history(q)

    history = await a.events(at_least=5)

    assert [e.sequence for e in history] == [1, 2, 3, 4, 5]
    kind = kinds(history)
    assert kind[:2] == [PAY_PER_USE_RECORDED, PACKAGE_STATE_CHANGED]  # ppu-1, activation
    # e1 wrote its pay-per-use part and the exhaustion in one transaction; then the revocation.
    assert sorted(kind[2:4]) == [PACKAGE_STATE_CHANGED, PAY_PER_USE_RECORDED]
    assert kind[4] == PACKAGE_STATE_CHANGED
    assert [(p, n) for _, p, n in state_changes(history)] == [
        (PENDING, ACTIVE),
        (ACTIVE, EXHAUSTED),
        (EXHAUSTED, REVOKED),
    ]
    assert len({e.event_id for e in history}) == 5 and all(e.event_id for e in history)
    assert [e.create_time for e in history[:3]] == [
        ts(START),
        ts("2024-01-02T00:00:00Z"),
        ts("2024-01-02T00:00:00Z"),
    ]
    # After a sequence: the rest; by type: the same events, same sequences.
    assert await a.events(after=3, at_least=2) == history[3:]
    only = await a.events(types=[PAY_PER_USE_RECORDED], at_least=2)
    assert only == [e for e in history if e.WhichOneof("payload") == PAY_PER_USE_RECORDED]
    both = await a.events(types=[PACKAGE_STATE_CHANGED, PAY_PER_USE_RECORDED], at_least=5)
    assert both == history
    assert await a.events(after=5) == []


async def test_watch_events_streams_live_events_after_the_history(q, a):
    await q.report("ppu-1")
    call = q.stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=0), metadata=q.admin, timeout=30
    )
    try:
        first = await asyncio.wait_for(call.read(), 10)
        assert (first.sequence, first.pay_per_use_recorded.usage_event_id) == (1, "ppu-1")

        await q.report("ppu-2")
        package = await q.grant(quantity=1)  # in force at once: nothing to announce
        await q.report("e1")  # exhausts the package

        live = [await asyncio.wait_for(call.read(), 10) for _ in range(2)]
    finally:
        call.cancel()
    assert [e.sequence for e in live] == [2, 3]
    assert live[0].pay_per_use_recorded.usage_event_id == "ppu-2"
    assert state_changes(live) == [(package.package_id, ACTIVE, EXHAUSTED)]


async def test_watch_events_rejects_bad_requests_and_account_tokens(q, a):
    await expect_error(a.events(types=["no_such_event"]), INVALID, "INVALID_FIELD", "event_types")
    await expect_error(a.events(after=-1), INVALID, "INVALID_FIELD", "after_sequence")
    await expect_error(events(q.stub, q.account(ACCOUNT), 0), DENIED, "PERMISSION_DENIED")
    await expect_error(events(q.stub, q.gateway, 0), DENIED, "PERMISSION_DENIED")
    await expect_error(
        events(q.stub, q.tokens.md(q.tokens.internal("quota")), 0), DENIED, "PERMISSION_DENIED"
    )
    for reader in ("billing", "notification"):  # the services that consume it
        assert await events(q.stub, q.tokens.md(q.tokens.internal(reader)), 0) == []


async def test_a_package_that_starts_and_ends_between_two_clock_moves_does_not_rearm(q, a):
    """Never in force, it never changed the aggregate total: a fired rule stays fired."""
    await q.grant(quantity=10)
    rule = await a.create(api=API, quantity=5)
    await q.report("e1", quantity=8)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 2, 10)]
    brief = await q.grant(
        quantity=100, effective="2024-02-01T00:00:00Z", expire="2024-02-10T23:59:59Z"
    )

    await q.set_time("2024-03-01T00:00:00Z")

    fresh = await a.log.new(at_least=1, of_type=PACKAGE_STATE_CHANGED)
    assert state_changes(fresh) == [(brief.package_id, PENDING, EXPIRED)]
    assert crossings(fresh) == []
    assert await a.state(rule.alert_id) == FIRED


async def test_the_expiry_warning_lead_is_a_setting(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, expiring_notice_days="3") as q:
        a = AlertCalls(q)
        package = await q.grant(quantity=10, expire=END_OF_JANUARY)
        await q.set_time("2024-01-28T23:59:59Z")
        assert await a.log.new() == []

        await q.advance(timedelta(seconds=1))

        (warning,) = payloads(await a.log.new(at_least=1), PACKAGE_EXPIRING)
        assert (warning.package.package_id, warning.days_left) == (package.package_id, 3)
