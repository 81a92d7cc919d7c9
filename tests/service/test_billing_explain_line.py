"""ExplainBillLine through real servers (docs/design/billing.md, "Explaining a pay-per-use
line"): two regional quota servers (HK and BKK, each its own SQLite database and region) and
billing reading both.

A pay-per-use event in BKK while the account holds a package bought in HK is explained with
quota's near misses (another API in BKK) followed by billing's: the HK package, as
NEAR_MISS_REASON_OTHER_REGION. Pages are bounded; a BKK quota that does not answer leaves the
event unavailable with billing's near misses; bad requests name their field.
"""

from __future__ import annotations

import grpc
import pytest
from allot.billing.v1 import billing_pb2, billing_service_pb2
from allot.quota.v1 import quota_pb2

from tests.support.billing import billing_settings, running_billing, write_catalog
from tests.support.calls import expect_error
from tests.support.quota import (
    last_event_sequence,
    regional_quota,
    sqlite_in,
    ts,
)
from tests.support.receivers import closed_port

HK, BKK = "ap-southeast-1", "ap-southeast-2"
PASSPORT, ID_CARD = "passport", "id-card"
ACCOUNT, OTHER = "acct-1", "acct-2"
START = "2024-01-01T00:00:00Z"  # 08:00 in the billing time zone: a cycle starts here
MISS = quota_pb2.NearMissReason


@pytest.fixture
async def suite(tmp_path):
    """(hk, bkk, billing handle), all running; the account exists in billing."""
    catalog = str(write_catalog(tmp_path))
    async with (
        regional_quota(tmp_path / "hk", HK, catalog, START) as hk,
        regional_quota(tmp_path / "bkk", BKK, catalog, START) as bkk,
    ):
        settings = billing_settings(
            sqlite_in(tmp_path / "billing"),
            tmp_path / "billing",
            "",
            START,
            catalog=catalog,
            quota_endpoints=f"{HK}={hk.handle.addr},{BKK}={bkk.handle.addr}",
            notification_addr=f"127.0.0.1:{closed_port()}",
        )
        async with running_billing(settings) as billing:
            await billing.calls.create_account(ACCOUNT)
            await billing.calls.create_account(OTHER)
            yield hk, bkk, billing


def _explain(billing, metadata=None, **fields):
    values = {
        "account_id": ACCOUNT,
        "month": "2024-01",
        "cycle_start_time": ts(START),
        "region": BKK,
        "api": PASSPORT,
        **fields,
    }
    return billing.calls.stub.ExplainBillLine(
        billing_service_pb2.ExplainBillLineRequest(**values),
        metadata=metadata or billing.calls.admin,
        timeout=20,
    )


def _misses(event) -> list[tuple[str, str, int]]:
    return [(m.package_id, m.region, m.reason) for m in event.near_misses]


async def test_pay_per_use_in_one_region_is_explained_by_a_package_in_another(suite):
    hk, bkk, billing = suite
    calls = billing.calls
    await calls.top_up(ACCOUNT, "10")
    order = await calls.purchase(ACCOUNT, "passport-100-1y", HK, "buy-hk", timeout=10)
    assert order.state == billing_pb2.ORDER_STATE_FULFILLED
    bought = order.package_id
    other_api = await bkk.grant(ACCOUNT, 5, region=BKK, api=ID_CARD)
    await hk.grant(OTHER, 50, region=HK)  # another account's: never listed

    assert (await bkk.report("b1", quantity=2, region=BKK)).pay_per_use_quantity == 2
    assert (await bkk.report("b2", region=BKK, project="p-x")).pay_per_use_quantity == 1
    await billing.caught_up(
        await last_event_sequence(bkk.handle, "pay_per_use_recorded"), bkk.handle.addr
    )

    expected = [(other_api.package_id, BKK, MISS.NEAR_MISS_REASON_OTHER_API)] + [
        (bought, HK, MISS.NEAR_MISS_REASON_OTHER_REGION)
    ]
    answer = await _explain(billing)
    assert [e.usage_event_id for e in answer.events] == ["b1", "b2"]
    assert answer.next_page_token == ""
    b1, b2 = answer.events
    assert (b1.pay_per_use_quantity, b1.enterprise_project_id) == (2, "0")
    assert (b2.pay_per_use_quantity, b2.enterprise_project_id) == (1, "p-x")
    for event in answer.events:
        assert not event.unavailable
        assert event.explanation.event_id == event.usage_event_id
        assert event.explanation.pay_per_use_quantity == event.pay_per_use_quantity
        # Quota's own list stops at its deployment; billing adds the HK package.
        assert _misses(event.explanation) == expected[:1]
        assert _misses(event) == expected
    assert b1.near_misses[1].api == PASSPORT

    # Bounded pages: one event a page, the token carries on.
    first = await _explain(billing, page_size=1)
    assert [e.usage_event_id for e in first.events] == ["b1"] and first.next_page_token
    second = await _explain(billing, page_size=1, page_token=first.next_page_token)
    assert [e.usage_event_id for e in second.events] == ["b2"]
    assert second.next_page_token == ""

    # The account's own token reads it; a token limited to BKK is not shown the HK package.
    tokens = calls.tokens
    own = await _explain(billing, tokens.md(tokens.account(ACCOUNT, read_only=True)))
    assert _misses(own.events[0]) == expected
    bkk_only = tokens.md(tokens.account(ACCOUNT, read_only=True, regions=[BKK]))
    assert _misses((await _explain(billing, bkk_only)).events[0]) == expected[:1]
    await expect_error(
        _explain(billing, tokens.md(tokens.account(OTHER))), grpc.StatusCode.PERMISSION_DENIED
    )

    # BKK's quota does not answer: the events are unavailable, billing's near miss stays.
    billing.service.context.quota.endpoints[BKK] = f"127.0.0.1:{closed_port()}"
    down = await _explain(billing)
    assert [(e.usage_event_id, e.unavailable) for e in down.events] == [
        ("b1", True),
        ("b2", True),
    ]
    assert not down.events[0].HasField("explanation")
    assert _misses(down.events[0]) == expected[1:]


async def test_bad_requests_name_their_field_and_unknown_lines_are_not_found(suite):
    _, _, billing = suite
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(_explain(billing, month="2024-13"), invalid, field="month")
    await expect_error(_explain(billing, month="2024-02"), invalid, field="cycle_start_time")
    await expect_error(
        _explain(billing, cycle_start_time=ts("2024-01-01T00:30:00Z")),
        invalid,
        field="cycle_start_time",
    )
    await expect_error(
        billing.calls.stub.ExplainBillLine(
            billing_service_pb2.ExplainBillLineRequest(
                account_id=ACCOUNT, month="2024-01", region=BKK, api=PASSPORT
            ),
            metadata=billing.calls.admin,
        ),
        invalid,
        field="cycle_start_time",
    )
    await expect_error(_explain(billing, page_size=-1), invalid, field="page_size")
    await expect_error(_explain(billing, page_token="nonsense"), invalid, field="page_token")
    await expect_error(_explain(billing), grpc.StatusCode.NOT_FOUND, "BILL_LINE_NOT_FOUND")
    await expect_error(
        _explain(billing, account_id="nobody"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )
