"""Usage alerts (docs/design/usage-alerts.md): edge-triggered rules on the aggregate
remaining quantity of the packages in force, re-armed and evaluated at once when the total or
the rule changes; each firing is one `threshold_crossed` event read back from WatchEvents."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from tests.support.calls import expect_error, ts
from tests.support.events import (
    ARMED,
    FIRED,
    THRESHOLD_CROSSED,
    AlertCalls,
    alert,
    payloads,
)
from tests.support.quota import (
    ACCOUNT,
    API,
    FREE,
    OTHER_ACCOUNT,
    OTHER_API,
    OTHER_REGION,
    REGION,
    QuotaCalls,
    quota_server,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


@pytest.fixture
def a(q) -> AlertCalls:
    return AlertCalls(q)


async def remaining(q: QuotaCalls, region: str = REGION, api: str = API) -> tuple[int, int]:
    """(total, remaining) of the packages in force, from GetQuotaSummary."""
    (item,) = (await q.summary(region=region, api=api)).items
    return item.total_quantity, item.remaining_quantity


def _with_id(message, alert_id: str):
    message.alert_id = alert_id
    return message


# --- the examples of docs/design/usage-alerts.md ------------------------------------------


async def test_percent_rule_fires_once_on_the_call_that_reaches_it_and_rearms_on_a_grant(q, a):
    await q.grant(quantity=100_000)
    rule = await a.create(api=API, percent=20)
    assert rule.state == ARMED
    assert await a.log.new_crossings() == []

    assert (await q.report("e1", quantity=79_999)).remaining_quantity == 20_001
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == ARMED

    assert (await q.report("e2", quantity=1)).remaining_quantity == 20_000
    fired = await a.log.new(at_least=1, of_type=THRESHOLD_CROSSED)
    (crossed,) = payloads(fired, THRESHOLD_CROSSED)
    assert (crossed.alert_id, crossed.account_id, crossed.region, crossed.api) == (
        rule.alert_id,
        ACCOUNT,
        REGION,
        API,
    )
    assert (crossed.remaining_quantity, crossed.total_quantity) == (20_000, 100_000)
    assert crossed.WhichOneof("threshold") == "threshold_percent"
    assert crossed.threshold_percent == 20.0
    assert await a.state(rule.alert_id) == FIRED

    # Down to 10,000 left in a batch of ten events: nothing more.
    batch = await q.batch([q.usage(f"b{i}", quantity=1_000) for i in range(10)])
    assert [r.remaining_quantity for r in batch.responses][-1] == 10_000
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == FIRED

    # A second package re-arms the rule without firing: 110,000 of 200,000 left.
    await q.grant(quantity=100_000)
    assert await remaining(q) == (200_000, 110_000)
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == ARMED

    assert (await q.report("e3", quantity=69_999)).remaining_quantity == 40_001
    assert await a.log.new_crossings() == []
    assert (await q.report("e4", quantity=1)).remaining_quantity == 40_000
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 40_000, 200_000)]
    await q.report("e5", quantity=30_000)
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == FIRED


async def test_renewal_that_leaves_remaining_below_an_absolute_threshold_fires_at_once(q, a):
    package = await q.grant(quantity=100_000)
    rule = await a.create(api=API, quantity=150_000)
    # 100,000 left is already at or below 150,000: it fired when it was created.
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 100_000, 100_000)]
    await q.report("e1", quantity=95_000)
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == FIRED

    renewed = await q.renew(package.package_id, add=100_000)

    assert (renewed.total_quantity, renewed.remaining_quantity) == (200_000, 105_000)
    fired = await a.log.new(at_least=1, of_type=THRESHOLD_CROSSED)
    (crossed,) = payloads(fired, THRESHOLD_CROSSED)
    assert (crossed.alert_id, crossed.remaining_quantity, crossed.total_quantity) == (
        rule.alert_id,
        105_000,
        200_000,
    )
    assert crossed.threshold_quantity == 150_000
    assert await a.state(rule.alert_id) == FIRED
    await q.report("e2", quantity=1_000)
    assert await a.log.new_crossings() == []


async def test_absolute_rule_sums_the_packages_that_stack(q, a):
    await q.grant(quantity=10_000)
    await q.grant(quantity=10_000)
    rule = await a.create(api=API, quantity=5_000)

    await q.report("e1", quantity=6_000)
    assert await a.log.new_crossings() == []  # one package alone would be under 5,000
    await q.report("e2", quantity=8_999)  # spans both packages: 5,001 left
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == ARMED

    assert (await q.report("e3", quantity=1)).remaining_quantity == 5_000
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 5_000, 20_000)]
    await q.report("e4", quantity=5_000)  # down to 0 and on into pay-per-use
    await q.report("e5", quantity=3)
    assert await a.log.new_crossings() == []


async def test_crossing_inside_a_batch_is_attributed_to_the_event_that_reached_it(q, a):
    await q.grant(quantity=100)
    rule = await a.create(api=API, quantity=50)

    responses = (await q.batch([q.usage(f"b{i}", quantity=7) for i in range(10)])).responses

    # 100, 93, ..., 51 after the 7th event, 44 after the 8th: the 8th event crossed.
    assert [r.remaining_quantity for r in responses][6:8] == [51, 44]
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 44, 100)]


# --- scope: regions and APIs -------------------------------------------------------------


async def test_usage_in_one_region_never_fires_another_regions_rule(q, a):
    await q.grant(quantity=10, region=REGION)
    await q.grant(quantity=10, region=OTHER_REGION)
    here = await a.create(api=API, region=REGION, quantity=5)
    there = await a.create(api=API, region=OTHER_REGION, quantity=5)
    everything_there = await a.create(api="", region=OTHER_REGION, quantity=5)

    await q.report("e1", quantity=12, region=REGION)  # down to 0, then pay-per-use

    assert await a.log.new_crossings(at_least=1) == [(here.alert_id, API, 0, 10)]
    assert await a.state(there.alert_id) == ARMED
    assert await a.state(everything_there.alert_id) == ARMED

    await q.report("e2", quantity=5, region=OTHER_REGION)
    fired = sorted(await a.log.new_crossings(at_least=2))
    assert fired == sorted([(there.alert_id, API, 5, 10), (everything_there.alert_id, API, 5, 10)])
    crossed = payloads(a.log.seen, THRESHOLD_CROSSED)
    assert {(c.alert_id, c.region) for c in crossed} == {
        (here.alert_id, REGION),
        (there.alert_id, OTHER_REGION),
        (everything_there.alert_id, OTHER_REGION),
    }


async def test_rule_for_every_api_fires_per_api_on_its_own(q, a):
    await q.grant(quantity=10, api=API)
    await q.grant(quantity=20, api=OTHER_API)
    every = await a.create(api="", percent=50)
    only_other = await a.create(api=OTHER_API, percent=50)
    other_account = await a.create(OTHER_ACCOUNT, api="", percent=50)

    await q.report("p1", quantity=5, api=API)
    assert await a.log.new_crossings(at_least=1) == [(every.alert_id, API, 5, 10)]
    assert await a.state(every.alert_id) == FIRED
    assert await a.state(only_other.alert_id) == ARMED

    # OTHER_API has its own state: the API firing did not silence it.
    await q.report("o1", quantity=9, api=OTHER_API)
    assert await a.log.new_crossings() == []
    await q.report("o2", quantity=1, api=OTHER_API)
    assert sorted(await a.log.new_crossings(at_least=2)) == sorted(
        [(every.alert_id, OTHER_API, 10, 20), (only_other.alert_id, OTHER_API, 10, 20)]
    )
    await q.report("p2", quantity=1, api=API)
    await q.report("o3", quantity=1, api=OTHER_API)
    assert await a.log.new_crossings() == []

    # A grant of one API re-arms that API only: 14 of 20 left, armed; it fires again at 10.
    await q.grant(quantity=10, api=API)
    assert await a.log.new_crossings() == []
    await q.report("p3", quantity=4, api=API)
    assert await a.log.new_crossings(at_least=1) == [(every.alert_id, API, 10, 20)]
    assert await a.state(other_account.alert_id) == ARMED


# --- rules created and edited ------------------------------------------------------------


async def test_rule_created_at_or_below_its_threshold_fires_at_once_and_only_once(q, a):
    await q.grant(quantity=10)
    await q.report("e1", quantity=8)

    rule = await a.create(api=API, quantity=5)

    assert rule.state == FIRED
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 2, 10)]
    await q.report("e2", quantity=1)
    await q.report("e3", quantity=5)
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == FIRED


async def test_rule_at_exactly_its_threshold_fires_on_creation(q, a):
    await q.grant(quantity=10)
    await q.report("e1", quantity=8)
    rule = await a.create(api=API, percent=20)  # 2 of 10 is exactly 20 %
    assert rule.state == FIRED
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 2, 10)]


async def test_rule_without_packages_in_force_waits_armed(q, a):
    rule = await a.create(api=API, quantity=5)
    await q.report("ppu", quantity=3)  # pay-per-use only: there is no quota to warn about
    await q.grant(quantity=10, effective="2024-02-01T00:00:00Z")  # not yet in force

    assert rule.state == ARMED
    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == ARMED


async def test_changing_the_threshold_rearms_and_evaluates_at_once(q, a):
    await q.grant(quantity=100)
    await q.report("e1", quantity=50)
    rule = await a.create(api=API, quantity=10)
    assert rule.state == ARMED

    raised = await a.update_alert(
        _with_id(alert(quantity=60), rule.alert_id), ["remaining_quantity"]
    )
    fired = await a.log.new(at_least=1, of_type=THRESHOLD_CROSSED)
    assert (raised.state, raised.remaining_quantity) == (FIRED, 60)
    assert raised.WhichOneof("threshold") == "remaining_quantity"
    (crossed,) = payloads(fired, THRESHOLD_CROSSED)
    assert (crossed.remaining_quantity, crossed.total_quantity, crossed.threshold_quantity) == (
        50,
        100,
        60,
    )

    # Editing re-arms even a fired rule: 50 % left is above 40 %, so it waits...
    edited = await a.update_alert(_with_id(alert(percent=40), rule.alert_id), ["remaining_percent"])
    assert (edited.state, edited.WhichOneof("threshold"), edited.remaining_percent) == (
        ARMED,
        "remaining_percent",
        40.0,
    )
    assert await a.log.new_crossings() == []
    # ... and fires when 40 % remain.
    await q.report("e2", quantity=9)
    assert await a.log.new_crossings() == []
    await q.report("e3", quantity=1)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 40, 100)]


async def test_disabled_rule_never_fires_and_enabling_it_evaluates_at_once(q, a):
    await q.grant(quantity=10)
    rule = await a.create(api=API, quantity=5, enabled=False)
    assert rule.enabled is False
    await q.report("e1", quantity=7)
    assert await a.log.new_crossings() == []

    enabled = await a.update_alert(_with_id(alert(enabled=True), rule.alert_id), ["enabled"])

    assert (enabled.enabled, enabled.state, enabled.remaining_quantity) == (True, FIRED, 5)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 3, 10)]


async def test_deleted_rule_no_longer_fires(q, a):
    await q.grant(quantity=10)
    rule = await a.create(api=API, quantity=5)
    await a.delete_alert(rule.alert_id)
    await q.report("e1", quantity=10)
    assert await a.log.new_crossings() == []


# --- CRUD --------------------------------------------------------------------------------


async def test_create_get_update_delete(q, a):
    await q.advance(timedelta(hours=1))
    created = await a.create(api=API, percent=12.5)

    assert created.alert_id
    assert (created.account_id, created.region, created.api, created.enabled) == (
        ACCOUNT,
        REGION,
        API,
        True,
    )
    assert (created.WhichOneof("threshold"), created.remaining_percent) == (
        "remaining_percent",
        12.5,
    )
    assert created.state == ARMED
    assert created.create_time == ts("2024-01-01T01:00:00Z") == created.update_time
    assert await a.get_alert(created.alert_id) == created

    await q.advance(timedelta(hours=1))
    update = alert(api=OTHER_API, quantity=7, enabled=False)
    updated = await a.update_alert(
        _with_id(update, created.alert_id), ["api", "remaining_quantity", "enabled"]
    )

    assert (updated.api, updated.WhichOneof("threshold"), updated.remaining_quantity) == (
        OTHER_API,
        "remaining_quantity",
        7,
    )
    assert updated.enabled is False
    assert (updated.account_id, updated.region) == (ACCOUNT, REGION)
    assert updated.create_time == created.create_time
    assert updated.update_time == ts("2024-01-01T02:00:00Z")
    assert await a.get_alert(created.alert_id) == updated

    # Only the fields in the mask change.
    renamed = await a.update_alert(_with_id(alert(api="", quantity=99), created.alert_id), ["api"])
    assert (renamed.api, renamed.remaining_quantity, renamed.enabled) == ("", 7, False)

    await a.delete_alert(created.alert_id)
    await expect_error(a.get_alert(created.alert_id), NOT_FOUND, "USAGE_ALERT_NOT_FOUND")
    await expect_error(a.delete_alert(created.alert_id), NOT_FOUND, "USAGE_ALERT_NOT_FOUND")
    await expect_error(
        a.update_alert(_with_id(alert(quantity=1), created.alert_id), ["remaining_quantity"]),
        NOT_FOUND,
        "USAGE_ALERT_NOT_FOUND",
    )
    assert list((await a.list_alerts()).usage_alerts) == []


async def test_create_is_idempotent_by_request_id(q, a):
    first = await a.create_alert(alert(api=API, quantity=5), request_id="r-1")
    again = await a.create_alert(alert(api=API, quantity=5), request_id="r-1")
    assert again == first
    assert [x.alert_id for x in (await a.list_alerts()).usage_alerts] == [first.alert_id]
    await expect_error(
        a.create_alert(alert(api=API, quantity=6), request_id="r-1"), INVALID, "REQUEST_ID_REUSED"
    )


async def test_list_alerts_page_by_page_and_by_region(q, a):
    mine = [
        (await a.create(region=region, api=api, quantity=n)).alert_id
        for n, (region, api) in enumerate(
            [
                (REGION, API),
                (REGION, OTHER_API),
                (REGION, ""),
                (OTHER_REGION, API),
                (OTHER_REGION, ""),
            ]
        )
    ]
    await a.create(OTHER_ACCOUNT, api=API, quantity=1)

    pages, token = [], ""
    for _ in range(10):  # bounded: 5 alerts in pages of 2
        page = await a.list_alerts(page_size=2, page_token=token)
        pages.append([x.alert_id for x in page.usage_alerts])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(x for p in pages for x in p) == sorted(mine)
    assert len([x for p in pages for x in p]) == len(mine)  # no alert twice

    only_other_region = (await a.list_alerts(region=OTHER_REGION)).usage_alerts
    assert sorted(x.alert_id for x in only_other_region) == sorted(mine[3:])
    assert {x.region for x in only_other_region} == {OTHER_REGION}
    all_of_them = (await a.list_alerts(page_size=100)).usage_alerts
    assert {x.account_id for x in all_of_them} == {ACCOUNT}
    assert (await a.list_alerts(page_size=100)).next_page_token == ""


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        ({"api": API}, "INVALID_FIELD", "usage_alert.threshold"),
        ({"api": API, "percent": 0.0}, "INVALID_FIELD", "usage_alert.remaining_percent"),
        ({"api": API, "percent": -5.0}, "INVALID_FIELD", "usage_alert.remaining_percent"),
        ({"api": API, "percent": 100.01}, "INVALID_FIELD", "usage_alert.remaining_percent"),
        ({"api": API, "percent": float("nan")}, "INVALID_FIELD", "usage_alert.remaining_percent"),
        ({"api": API, "quantity": -1}, "INVALID_FIELD", "usage_alert.remaining_quantity"),
        ({"api": API, "quantity": 5, "region": "mars-1"}, "UNKNOWN_REGION", "usage_alert.region"),
        ({"api": API, "quantity": 5, "region": ""}, "INVALID_FIELD", "usage_alert.region"),
        ({"api": "no-such-api", "quantity": 5}, "UNKNOWN_API", "usage_alert.api"),
        ({"account_id": "", "api": API, "quantity": 5}, "INVALID_FIELD", "usage_alert.account_id"),
    ],
)
async def test_create_rejects_invalid_rules_naming_the_field(a, fields, reason, field):
    fields = dict(fields)  # the parameters are shared by both databases' runs
    account_id = fields.pop("account_id", ACCOUNT)
    await expect_error(a.create(account_id, **fields), INVALID, reason, field)
    assert list((await a.list_alerts(page_size=100)).usage_alerts) == []


async def test_threshold_edges_are_accepted(a):
    hundred = await a.create(api=API, percent=100.0)
    zero = await a.create(api=API, quantity=0)
    assert (hundred.remaining_percent, zero.WhichOneof("threshold"), zero.remaining_quantity) == (
        100.0,
        "remaining_quantity",
        0,
    )


async def test_update_rejects_invalid_changes_naming_the_field(a):
    rule = await a.create(api=API, quantity=5)

    cases = [
        (
            alert(percent=0.0),
            ["remaining_percent"],
            "INVALID_FIELD",
            "usage_alert.remaining_percent",
        ),
        (
            alert(percent=101.0),
            ["remaining_percent"],
            "INVALID_FIELD",
            "usage_alert.remaining_percent",
        ),
        (
            alert(quantity=-3),
            ["remaining_quantity"],
            "INVALID_FIELD",
            "usage_alert.remaining_quantity",
        ),
        (alert(api="no-such-api"), ["api"], "UNKNOWN_API", "usage_alert.api"),
        (alert(region=OTHER_REGION), ["region"], "INVALID_FIELD", "update_mask"),
        (alert(OTHER_ACCOUNT), ["account_id"], "INVALID_FIELD", "update_mask"),
    ]
    for message, paths, reason, field in cases:
        await expect_error(
            a.update_alert(_with_id(message, rule.alert_id), paths), INVALID, reason, field
        )
    assert await a.get_alert(rule.alert_id) == rule
    await expect_error(
        a.update_alert(alert(quantity=1), ["remaining_quantity"]), INVALID, "INVALID_FIELD"
    )
    await expect_error(a.get_alert(""), INVALID, "INVALID_FIELD", "alert_id")


# --- who may -----------------------------------------------------------------------------


async def test_account_tokens_manage_only_their_own_alerts(q, a):
    own = q.account(ACCOUNT)
    other = q.account(OTHER_ACCOUNT)
    reader = q.account(ACCOUNT, read_only=True)

    mine = await a.create(api=API, quantity=5, metadata=own)
    assert mine.account_id == ACCOUNT
    theirs = await a.create(OTHER_ACCOUNT, api=API, quantity=5)

    await expect_error(
        a.create(OTHER_ACCOUNT, api=API, quantity=5, metadata=own), DENIED, "PERMISSION_DENIED"
    )
    await expect_error(a.get_alert(theirs.alert_id, metadata=own), DENIED, "PERMISSION_DENIED")
    await expect_error(
        a.update_alert(
            _with_id(alert(quantity=1), theirs.alert_id), ["remaining_quantity"], metadata=own
        ),
        DENIED,
        "PERMISSION_DENIED",
    )
    # Naming its own account in the request does not let it touch another's rule.
    await expect_error(
        a.update_alert(
            _with_id(alert(ACCOUNT, quantity=1), theirs.alert_id),
            ["remaining_quantity"],
            metadata=own,
        ),
        DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(a.delete_alert(theirs.alert_id, metadata=own), DENIED, "PERMISSION_DENIED")
    await expect_error(a.list_alerts(OTHER_ACCOUNT, metadata=own), DENIED, "PERMISSION_DENIED")
    assert await a.get_alert(theirs.alert_id, metadata=other) == theirs

    # Its own: read, listed (its account by default), changed, deleted.
    assert await a.get_alert(mine.alert_id, metadata=own) == mine
    assert [x.alert_id for x in (await a.list_alerts("", metadata=own)).usage_alerts] == [
        mine.alert_id
    ]
    changed = await a.update_alert(
        _with_id(alert(quantity=9), mine.alert_id), ["remaining_quantity"], metadata=own
    )
    assert changed.remaining_quantity == 9

    # account_read reads but changes nothing.
    assert await a.get_alert(mine.alert_id, metadata=reader) == changed
    assert [x.alert_id for x in (await a.list_alerts(metadata=reader)).usage_alerts] == [
        mine.alert_id
    ]
    await expect_error(a.create(api=API, quantity=5, metadata=reader), DENIED, "PERMISSION_DENIED")
    await expect_error(
        a.update_alert(
            _with_id(alert(quantity=1), mine.alert_id), ["remaining_quantity"], metadata=reader
        ),
        DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(a.delete_alert(mine.alert_id, metadata=reader), DENIED, "PERMISSION_DENIED")

    await a.delete_alert(mine.alert_id, metadata=own)
    assert [x.alert_id for x in (await a.list_alerts(page_size=100)).usage_alerts] == []
    assert (await a.get_alert(theirs.alert_id)) == theirs


async def test_account_token_cannot_learn_whether_an_alert_id_exists_on_get(q, a):
    own = q.account(ACCOUNT)
    await expect_error(a.get_alert("alr-does-not-exist", metadata=own), DENIED, "PERMISSION_DENIED")


async def test_account_token_cannot_learn_whether_an_alert_id_exists_on_update_or_delete(q, a):
    own = q.account(ACCOUNT)
    missing = "alr-does-not-exist"
    await expect_error(a.delete_alert(missing, metadata=own), DENIED, "PERMISSION_DENIED")
    await expect_error(
        a.update_alert(_with_id(alert(quantity=1), missing), ["remaining_quantity"], metadata=own),
        DENIED,
        "PERMISSION_DENIED",
    )


async def test_admin_may_manage_any_accounts_alerts_and_a_gateway_none(q, a):
    rule = await a.create(api=API, quantity=5, metadata=q.admin)
    assert (await a.get_alert(rule.alert_id, metadata=q.admin)).account_id == ACCOUNT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await a.get_alert(rule.alert_id, metadata=q.gateway)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await a.delete_alert(rule.alert_id, metadata=q.admin)
    assert list((await a.list_alerts()).usage_alerts) == []


async def test_free_package_counts_like_any_other(q, a):
    """The aggregate covers every source; it is not limited to purchased packages."""
    await q.grant(quantity=6, source=FREE)
    await q.grant(quantity=4)
    rule = await a.create(api=API, quantity=3)
    await q.report("e1", quantity=7)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 3, 10)]


# --- re-arming is for the rule or scope that changed -------------------------------------


async def test_creating_or_editing_one_rule_does_not_rearm_the_others(q, a):
    await q.grant(quantity=10)
    await q.report("e1", quantity=8)
    first = await a.create(api=API, quantity=5)
    assert await a.log.new_crossings(at_least=1) == [(first.alert_id, API, 2, 10)]

    second = await a.create(api="", quantity=1)  # 2 left is above 1: armed, silent
    await a.update_alert(_with_id(alert(quantity=0), second.alert_id), ["remaining_quantity"])
    await a.create(api=API, quantity=1, enabled=False)

    assert await a.log.new_crossings() == []
    assert await a.state(first.alert_id) == FIRED


async def test_renewal_that_only_extends_the_expiry_does_not_rearm(q, a):
    package = await q.grant(quantity=10)
    rule = await a.create(api=API, quantity=5)
    await q.report("e1", quantity=6)
    assert await a.log.new_crossings(at_least=1) == [(rule.alert_id, API, 4, 10)]

    await q.renew(package.package_id, expire="2025-12-31T23:59:59Z")  # total stays 10

    assert await a.log.new_crossings() == []
    assert await a.state(rule.alert_id) == FIRED


async def test_alert_in_a_region_this_process_does_not_serve_is_refused(database_url, tmp_path):
    async with quota_server(database_url, tmp_path, quota_regions=REGION) as q:
        a = AlertCalls(q)
        await expect_error(
            a.create(region=OTHER_REGION, api=API, quantity=5),
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGION_NOT_SERVED",
        )
        assert (await a.create(region=REGION, api=API, quantity=5)).region == REGION
