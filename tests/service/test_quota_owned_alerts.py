"""Owned usage alert rules (docs/design/usage-alerts.md, "Owned rules"): a rule the suite keeps
on an account's behalf (UsageAlert.owner, e.g. an auto-replenish setting's). Only the suite's
services set the owner, on create; the account's tokens see the rule with its owner but may not
change or delete it; its crossings carry the owner."""

from __future__ import annotations

import grpc
import pytest

from tests.support.calls import expect_error
from tests.support.events import THRESHOLD_CROSSED, AlertCalls, alert, payloads
from tests.support.quota import ACCOUNT, API, QuotaCalls

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
OWNER = "auto_replenish"


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


@pytest.fixture
def a(q) -> AlertCalls:
    return AlertCalls(q)


def _owned(quantity: int = 20, owner: str = OWNER, **fields):
    message = alert(api=API, quantity=quantity, **fields)
    message.owner = owner
    return message


def _billing(q: QuotaCalls):
    return q.tokens.md(q.tokens.internal("billing"))


async def test_only_the_suites_services_set_an_owner_and_it_is_shown_and_carried(q, a):
    await q.grant(quantity=100)
    own = q.account(ACCOUNT)

    # An account token, and even an admin, may not make a system rule; nothing is written.
    await expect_error(
        a.create_alert(_owned(), metadata=own), INVALID, "INVALID_FIELD", "usage_alert.owner"
    )
    await expect_error(a.create_alert(_owned()), INVALID, "INVALID_FIELD", "usage_alert.owner")
    assert list((await a.list_alerts(metadata=own)).usage_alerts) == []
    # Billing may; a malformed owner is refused even for it.
    for bad in ("Auto-Replenish", "1st", "x" * 41):
        await expect_error(
            a.create_alert(_owned(owner=bad), metadata=_billing(q)),
            INVALID,
            "INVALID_FIELD",
            "usage_alert.owner",
        )
    rule = await a.create_alert(_owned(), metadata=_billing(q))
    assert rule.owner == OWNER
    mine = await a.create(api=API, quantity=10, metadata=own)
    assert mine.owner == ""

    # Get and List show the owner to the account's own tokens (transparency: listed, marked).
    assert (await a.get_alert(rule.alert_id, metadata=own)).owner == OWNER
    listed = await a.list_alerts(metadata=own)
    assert sorted((r.alert_id, r.owner) for r in listed.usage_alerts) == sorted(
        [(rule.alert_id, OWNER), (mine.alert_id, "")]
    )

    # Its crossing carries the owner; the customer's rule's does not.
    await a.log.new()
    await q.report("down", quantity=95)  # 5 left: both rules fire
    crossed = payloads(await a.log.new(at_least=2, of_type=THRESHOLD_CROSSED), THRESHOLD_CROSSED)
    assert sorted((c.alert_id, c.owner) for c in crossed) == sorted(
        [(rule.alert_id, OWNER), (mine.alert_id, "")]
    )


async def test_account_tokens_may_not_change_or_delete_an_owned_rule(q, a):
    await q.grant(quantity=100)
    own = q.account(ACCOUNT)
    rule = await a.create_alert(_owned(), metadata=_billing(q))
    change = alert(api=API, quantity=50)
    change.alert_id = rule.alert_id

    await expect_error(
        a.update_alert(change, ["remaining_quantity"], metadata=own),
        PRECONDITION,
        "USAGE_ALERT_OWNED",
    )
    await expect_error(
        a.delete_alert(rule.alert_id, metadata=own), PRECONDITION, "USAGE_ALERT_OWNED"
    )
    assert (await a.get_alert(rule.alert_id)).remaining_quantity == 20  # unchanged

    # The owner is immutable, for every caller: neither named in the mask nor changed.
    await expect_error(
        a.update_alert(change, ["owner"], metadata=_billing(q)),
        INVALID,
        "INVALID_FIELD",
        "update_mask",
    )
    other_owner = alert(api=API, quantity=50)
    other_owner.alert_id, other_owner.owner = rule.alert_id, "someone_else"
    await expect_error(
        a.update_alert(other_owner, ["remaining_quantity"], metadata=_billing(q)),
        INVALID,
        "INVALID_FIELD",
        "usage_alert.owner",
    )
    # A customer's rule cannot be turned into an owned one either.
    mine = await a.create(api=API, quantity=10, metadata=own)
    claim = alert(api=API, quantity=10)
    claim.alert_id, claim.owner = mine.alert_id, OWNER
    await expect_error(
        a.update_alert(claim, ["remaining_quantity"], metadata=own),
        INVALID,
        "INVALID_FIELD",
        "usage_alert.owner",
    )

    # Its owner (billing) changes it, keeping the owner; an admin may delete it.
    changed = await a.update_alert(change, ["remaining_quantity"], metadata=_billing(q))
    assert (changed.remaining_quantity, changed.owner) == (50, OWNER)
    await a.delete_alert(rule.alert_id)
    assert [r.alert_id for r in (await a.list_alerts()).usage_alerts] == [mine.alert_id]
