"""ListPackages pages (AIP-158): keyset pages in package_id order, tokens bound to their query."""

from __future__ import annotations

import grpc
import pytest

from tests.support.calls import expect_error
from tests.support.quota import ACCOUNT, ACTIVE, API, OTHER_ACCOUNT, OTHER_API, PENDING, QuotaCalls

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


async def test_pages_of_two_walk_five_packages_once_in_id_order(q):
    granted = [(await q.grant(quantity=n + 1)).package_id for n in range(5)]
    await q.grant(OTHER_ACCOUNT)  # another account's package is not listed

    pages, token = [], ""
    while True:
        page = await q.list_packages(ACCOUNT, page_size=2, page_token=token)
        pages.append([p.package_id for p in page.packages])
        token = page.next_page_token
        if not token:
            break

    assert [len(p) for p in pages] == [2, 2, 1]
    assert [pid for page in pages for pid in page] == sorted(granted)


async def test_list_filters_by_region_api_and_state(q):
    passport = await q.grant(api=API)
    id_card = await q.grant(api=OTHER_API)
    pending = await q.grant(api=API, effective="2024-02-01T00:00:00Z")

    assert await q.package_ids(api=OTHER_API) == [id_card.package_id]
    assert await q.package_ids(states=[PENDING]) == [pending.package_id]
    assert sorted(await q.package_ids(api=API, states=[ACTIVE, PENDING])) == sorted(
        [passport.package_id, pending.package_id]
    )
    assert await q.package_ids(region="ap-southeast-3") == []


async def test_page_token_used_with_another_query_is_rejected(q, subtests):
    for _ in range(3):
        await q.grant()
    first = await q.list_packages(ACCOUNT, api=API, page_size=1)
    token = first.next_page_token
    assert token

    for name, query in {
        "other api": {"api": OTHER_API},
        "other states": {"api": API, "states": [ACTIVE]},
        "other account": {"account_id": OTHER_ACCOUNT, "api": API},
        "no filter": {},
    }.items():
        with subtests.test(name):
            call = q.list_packages(**{"account_id": ACCOUNT, **query}, page_token=token)
            await expect_error(call, INVALID, "INVALID_FIELD", "page_token")
    await expect_error(q.list_packages(page_token="%%%"), INVALID, "INVALID_FIELD", "page_token")

    # The same query may change its page size.
    rest = await q.list_packages(ACCOUNT, api=API, page_size=5, page_token=token)
    assert len(rest.packages) == 2 and not rest.next_page_token
