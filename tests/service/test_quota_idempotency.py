"""Exactly once (docs/design/deduction-order.md) and request ids (AIP-155): replays return the first
result and change nothing; a batch fails slot by slot; concurrent twins still count once."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from google.rpc import code_pb2

from tests.support.calls import expect_error, status_details
from tests.support.events import AlertCalls, alert
from tests.support.quota import (
    ACCOUNT,
    API,
    EXHAUSTED,
    OTHER_ACCOUNT,
    OTHER_REGION,
    REGION,
    REVOKED,
    QuotaCalls,
    deductions,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _alert_id(message, alert_id: str):
    message.alert_id = alert_id
    return message


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


async def test_replayed_report_returns_the_original_result_and_changes_nothing(q):
    package = await q.grant(quantity=10)
    original = await q.report("e1", quantity=12)
    await q.advance(timedelta(hours=1))  # a late retry of an event reported without occur_time

    replay = await q.report("e1", quantity=12)

    assert (original.duplicate, replay.duplicate) == (False, True)
    assert deductions(replay) == deductions(original) == [(package.package_id, 10)]
    assert replay.pay_per_use_quantity == original.pay_per_use_quantity == 2
    assert replay.remaining_quantity == original.remaining_quantity == 0
    assert (await q.get(package.package_id)).used_quantity == 10


async def test_replay_reports_the_original_remaining_even_after_later_usage(q):
    await q.grant(quantity=10)
    first = await q.report("e1", quantity=3)
    await q.report("e2", quantity=4)

    replay = await q.report("e1", quantity=3)

    assert (first.remaining_quantity, replay.remaining_quantity) == (7, 7)
    assert (await q.summary()).items[0].remaining_quantity == 3


async def test_grant_retried_with_same_request_id_creates_one_package(q):
    first = await q.grant(quantity=10, request_id="order-1")
    await q.advance(timedelta(minutes=5))
    again = await q.grant(quantity=10, request_id="order-1")

    assert again == first
    assert await q.package_ids() == [first.package_id]
    # Another request id is another package.
    other = await q.grant(quantity=10, request_id="order-2")
    assert sorted(await q.package_ids()) == sorted([first.package_id, other.package_id])


async def test_concurrent_grants_with_one_request_id_create_one_package(q):
    results = await asyncio.gather(*(q.grant(quantity=10, request_id="order-1") for _ in range(8)))

    assert {p.package_id for p in results} == {results[0].package_id}
    assert await q.package_ids() == [results[0].package_id]


async def test_other_mutations_retried_with_same_request_id_return_the_first_result(q):
    package = await q.grant(quantity=10)

    renewed = await q.renew(package.package_id, add=5, request_id="renew-1")
    assert await q.renew(package.package_id, add=5, request_id="renew-1") == renewed
    assert (await q.get(package.package_id)).total_quantity == 15

    revoked = await q.revoke(package.package_id, request_id="revoke-1")
    assert await q.revoke(package.package_id, request_id="revoke-1") == revoked
    assert revoked.state == REVOKED

    enabled = await q.enable(request_id="sub-1")
    await q.advance(timedelta(minutes=1))
    assert await q.enable(request_id="sub-1") == enabled
    assert len((await q.subscriptions()).api_subscriptions) == 1


async def test_concurrent_twins_of_one_event_are_counted_once(q):
    package = await q.grant(quantity=100)

    with_package, without = await asyncio.gather(
        asyncio.gather(*(q.report("e1", quantity=3) for _ in range(8))),
        asyncio.gather(*(q.report("e2", OTHER_ACCOUNT, quantity=3) for _ in range(8))),
    )

    for results in (with_package, without):
        assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    assert {tuple(deductions(r)) for r in with_package} == {((package.package_id, 3),)}
    assert {r.pay_per_use_quantity for r in without} == {3}
    assert (await q.get(package.package_id)).used_quantity == 3


async def test_concurrent_reports_never_overdraw_a_package(q):
    package = await q.grant(quantity=10)

    results = await asyncio.gather(*(q.report(f"e{i}", quantity=1) for i in range(20)))

    assert sum(sum(d.quantity for d in r.deductions) for r in results) == 10
    assert sum(r.pay_per_use_quantity for r in results) == 10
    after = await q.get(package.package_id)
    assert (after.used_quantity, after.remaining_quantity) == (10, 0)


async def test_batch_invalid_event_fails_alone(q):
    package = await q.grant(quantity=10)

    response = await q.batch(
        [q.usage("e1", quantity=2), q.usage("e2", quantity=-1), q.usage("e3", quantity=3)]
    )

    first, bad, third = response.responses
    assert (first.event_id, deductions(first)) == ("e1", [(package.package_id, 2)])
    assert (third.event_id, deductions(third)) == ("e3", [(package.package_id, 3)])
    assert third.remaining_quantity == 5
    assert [f.name for f, _ in bad.ListFields()] == ["error"]
    assert bad.error.code == code_pb2.INVALID_ARGUMENT
    assert status_details(bad.error)[0] == "INVALID_FIELD"
    assert (await q.get(package.package_id)).used_quantity == 5
    await expect_error(q.explain("e2"), grpc.StatusCode.NOT_FOUND, "USAGE_EVENT_NOT_FOUND")


async def test_batch_slot_with_malformed_timestamp_names_its_path(q):
    bad = q.usage("e2")
    bad.occur_time.nanos = -1

    response = await q.batch([q.usage("e1"), bad])

    assert not response.responses[0].HasField("error")
    slot = response.responses[1]
    assert slot.error.code == code_pb2.INVALID_ARGUMENT
    assert status_details(slot.error) == ("INVALID_FIELD", ["requests[1].occur_time"])


async def test_batch_slot_validation_error_names_its_path(q):
    response = await q.batch([q.usage("e1"), q.usage("e2", quantity=-1)])

    assert status_details(response.responses[1].error) == (
        "INVALID_FIELD",
        ["requests[1].quantity"],
    )


async def test_same_event_twice_in_one_batch_counts_once(q):
    package = await q.grant(quantity=10)

    first, second = (
        await q.batch([q.usage("e1", quantity=4), q.usage("e1", quantity=4)])
    ).responses

    assert (first.duplicate, second.duplicate) == (False, True)
    assert deductions(first) == deductions(second) == [(package.package_id, 4)]
    assert (await q.get(package.package_id)).used_quantity == 4


async def test_same_event_twice_in_one_batch_with_other_content_is_rejected(q):
    package = await q.grant(quantity=10)

    first, second = (
        await q.batch([q.usage("e1", quantity=4), q.usage("e1", quantity=5)])
    ).responses

    assert deductions(first) == [(package.package_id, 4)]
    assert status_details(second.error) == ("EVENT_ID_REUSED", ["requests[1].event_id"])
    assert (await q.get(package.package_id)).used_quantity == 4


async def test_batch_replays_events_recorded_before(q):
    await q.grant(quantity=10)
    original = await q.report("e1", quantity=4)

    replay, fresh = (
        await q.batch([q.usage("e1", quantity=4), q.usage("e2", quantity=1)])
    ).responses

    assert replay.duplicate and deductions(replay) == deductions(original)
    assert not fresh.duplicate and fresh.remaining_quantity == 5


async def test_batch_events_are_applied_in_order(q):
    package = await q.grant(quantity=10)

    responses = (await q.batch([q.usage(f"e{i}", quantity=4) for i in range(3)])).responses

    assert [sum(d.quantity for d in r.deductions) for r in responses] == [4, 4, 2]
    assert [r.pay_per_use_quantity for r in responses] == [0, 0, 2]
    assert [r.remaining_quantity for r in responses] == [6, 2, 0]
    assert (await q.get(package.package_id)).state == EXHAUSTED


async def test_batch_over_a_thousand_events_is_rejected_whole(q):
    package = await q.grant(quantity=10)
    requests = [q.usage(f"e{i}") for i in range(1001)]

    await expect_error(q.batch(requests), INVALID, "INVALID_FIELD", "requests")

    assert (await q.get(package.package_id)).used_quantity == 0
    assert len((await q.batch(requests[:1000])).responses) == 1000


# --- request ids belong to their caller (docs/security.md) ----------------------------------


async def test_request_ids_belong_to_the_calling_account(q):
    """Regression: a replay skipped the owner check, so another account sending the exact
    request (same request_id) got the rule back, and could reserve ids so that the owner's
    requests failed with REQUEST_ID_REUSED."""
    a = AlertCalls(q)
    own, stranger = q.account(ACCOUNT), q.account(OTHER_ACCOUNT)
    mine = await a.create(api=API, quantity=5, metadata=own)
    theirs = await a.create(OTHER_ACCOUNT, api=API, quantity=5)
    # The request names the rule by id only (no account): nothing for the policy to check.
    change = _alert_id(alert("", region="", quantity=9), mine.alert_id)

    # The stranger reserves the id first, with its own request.
    reserved = await a.update_alert(
        _alert_id(alert("", region="", quantity=7), theirs.alert_id),
        ["remaining_quantity"],
        "upd-1",
        stranger,
    )
    assert reserved.remaining_quantity == 7
    # The owner's request with that id is its own, not REQUEST_ID_REUSED.
    updated = await a.update_alert(change, ["remaining_quantity"], "upd-1", own)
    assert updated.remaining_quantity == 9
    assert await a.update_alert(change, ["remaining_quantity"], "upd-1", own) == updated

    # The stranger replaying the owner's exact request is refused (its own id upd-1 is taken
    # by its own other request), and changes nothing.
    await expect_error(
        a.update_alert(change, ["remaining_quantity"], "upd-1", stranger),
        INVALID,
        "REQUEST_ID_REUSED",
        "request_id",
    )
    again = await a.update_alert(change, ["remaining_quantity"], "upd-2", own)
    await expect_error(
        a.update_alert(change, ["remaining_quantity"], "upd-2", stranger),
        DENIED,
        "PERMISSION_DENIED",
    )
    assert again.remaining_quantity == 9
    assert await a.get_alert(mine.alert_id) == again
    assert (await a.get_alert(theirs.alert_id)).remaining_quantity == 7

    # Operators keep one scope of their own (billing's retried commands find their keys).
    by_admin = await a.update_alert(change, ["remaining_quantity"], "upd-1")
    assert await a.update_alert(change, ["remaining_quantity"], "upd-1") == by_admin


async def test_a_stored_reply_is_returned_only_to_a_caller_that_may_see_it(q):
    """A region-limited token of the same account does not read a reply about another
    region by replaying the request."""
    a = AlertCalls(q)
    own = q.account(ACCOUNT)
    elsewhere = q.tokens.md(q.tokens.account(ACCOUNT, regions=[OTHER_REGION]))
    here = q.tokens.md(q.tokens.account(ACCOUNT, regions=[REGION]))
    rule = await a.create(api=API, quantity=5, metadata=own)
    change = _alert_id(alert("", region="", quantity=3), rule.alert_id)
    updated = await a.update_alert(change, ["remaining_quantity"], "upd-r", own)

    await expect_error(
        a.update_alert(change, ["remaining_quantity"], "upd-r", elsewhere),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REGION_MISMATCH",
    )
    assert await a.update_alert(change, ["remaining_quantity"], "upd-r", here) == updated
