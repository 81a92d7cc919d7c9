"""RecommendPackages through real servers (docs/design/what-if.md, "Recommendations"): a quota
server and a billing server in-process on manual clocks, billing following quota's stream and
settling the pay-per-use it sees, then replaying the year through quota's SimulateUsage.

The account makes 12,500 passport calls a month for a year, 150,000 in all, on pay-per-use at
0.0025 a call (375.00). Which mix is cheapest is the catalog's business: with the 100k package
at 180.00, one package and pay-per-use for the rest (305.00) beats two packages (360.00); at
100.00, two packages (200.00) beat one and pay-per-use (225.00).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import grpc
import pytest
from allot.billing.v1 import billing_service_pb2

from tests.support.billing import billing_settings, local, micros, running_billing
from tests.support.calls import expect_error
from tests.support.quota import QuotaCalls, running_quota
from tests.support.quota import quota_settings as quota_settings_for

START = "2024-01-01T00:00:00Z"  # 08:00 in the billing time zone
HK, PASSPORT, ACCOUNT = "ap-southeast-1", "passport", "planner"
MONTHLY_CALLS = 12_500

CATALOG = """\
currency: USD
regions:
  - {{id: ap-southeast-1, name: CN-Hong Kong}}
apis:
  - id: passport
    name: Passport OCR
    price_tiers:
      - {{unit_price: "0.0025"}}
offers:
  - {{id: passport-100k-1y, api: passport, quantity: 100000, validity_months: 12, price: "{big}"}}
  - {{id: passport-10k-1y, api: passport, quantity: 10000, validity_months: 12, price: "30.00"}}
"""


@contextlib.asynccontextmanager
async def suite(urls, tmp_path, big_price: str):
    quota_url, billing_url = urls
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(big=big_price))
    for name in ("quota", "billing"):
        (tmp_path / name).mkdir(exist_ok=True)
    quota_settings = quota_settings_for(
        quota_url, tmp_path / "quota", clock="manual", clock_start=START, catalog=str(catalog)
    )
    async with running_quota(quota_settings) as quota:
        settings = billing_settings(
            billing_url, tmp_path / "billing", quota.addr, START, catalog=str(catalog)
        )
        async with running_billing(settings) as billing:
            yield quota, billing


async def a_year_of_usage(quota, billing) -> None:
    """12,500 calls on the 2nd of every month of 2024 (billing following and settling)."""
    calls = QuotaCalls(quota)
    await billing.calls.create_account(ACCOUNT)
    await billing.calls.top_up(ACCOUNT, "1000")
    for month in range(1, 13):
        at = local(f"2024-{month:02d}-02 10:00")
        await calls.set_time(at)
        await billing.caught_up_with(quota)
        await billing.calls.set_time(at)
        await calls.report(f"use-{month}", ACCOUNT, MONTHLY_CALLS, occur=at)
    # A year after the clocks started: every cycle settled, the window is 2024.
    end = local("2025-01-01 09:00")
    await calls.set_time(end)
    await billing.caught_up_with(quota)
    await billing.calls.set_time(end)


def recommend(billing, months: int = 12, account_id: str = ACCOUNT, metadata=None):
    return billing.calls.stub.RecommendPackages(
        billing_service_pb2.RecommendPackagesRequest(
            account_id=account_id, region=HK, api=PASSPORT, months=months
        ),
        metadata=metadata or billing.calls.admin,
    )


def mixes(answer) -> list[tuple[tuple[tuple[str, int], ...], int]]:
    """(offers and counts, expected cost in micros) of every candidate, in order."""
    return [
        (tuple((o.offer_id, o.count) for o in c.offers), micros(c.expected_cost))
        for c in answer.candidates
    ]


def dollars(amount: str) -> int:
    units, _, cents = amount.partition(".")
    return int(units) * 1_000_000 + int(cents.ljust(6, "0"))


@pytest.mark.parametrize(
    ("big_price", "best", "best_cost", "runner_up", "runner_up_cost"),
    [
        # 180 + 50,000 × 0.0025 = 305 beats 2 × 180 = 360.
        ("180.00", (("passport-100k-1y", 1),), "305.00", (("passport-100k-1y", 2),), "360.00"),
        # 2 × 100 = 200 beats 100 + 125 = 225.
        ("100.00", (("passport-100k-1y", 2),), "200.00", (("passport-100k-1y", 1),), "225.00"),
    ],
)
async def test_the_catalog_decides_between_one_package_and_pay_per_use_or_two(
    quota_and_billing_urls, tmp_path, big_price, best, best_cost, runner_up, runner_up_cost
):
    async with suite(quota_and_billing_urls, tmp_path, big_price) as (quota, billing):
        await a_year_of_usage(quota, billing)
        answer = await recommend(billing)

    found = mixes(answer)
    assert found[0] == (best, dollars(best_cost))
    assert (runner_up, dollars(runner_up_cost)) in found[1:]
    costs = [cost for _, cost in found]
    assert costs == sorted(costs)
    # What was paid: 150,000 calls on pay-per-use.
    assert micros(answer.actual_cost) == dollars("375.00")
    assert answer.actual_cost.currency_code == "USD"
    top = answer.candidates[0]
    assert micros(top.saving) == dollars("375.00") - dollars(best_cost)
    assert micros(top.package_cost) + micros(top.pay_per_use_cost) == micros(top.expected_cost)
    assert [o.purchases for o in top.offers] == [1]
    # Pay-per-use alone is a candidate: all 150,000 calls, what was paid, no saving.
    alone = next(c for c in answer.candidates if not c.offers)
    assert alone.pay_per_use_quantity == 150_000 and micros(alone.saving) == 0
    # Two 100k packages leave 50,000 calls forfeited (they expire after the window, though:
    # nothing is forfeited within it); one leaves 50,000 calls on pay-per-use.
    by_mix = {tuple((o.offer_id, o.count) for o in c.offers): c for c in answer.candidates}
    assert by_mix[(("passport-100k-1y", 1),)].pay_per_use_quantity == 50_000
    assert by_mix[(("passport-100k-1y", 2),)].pay_per_use_quantity == 0
    # A mix of both offers was looked at: 100k and five 10k (180 or 100, plus 150).
    mixed = by_mix[(("passport-100k-1y", 1), ("passport-10k-1y", 5))]
    assert micros(mixed.expected_cost) == dollars(big_price) + dollars("150.00")


async def test_recommendation_errors(quota_and_billing_urls, tmp_path):
    async with suite(quota_and_billing_urls, tmp_path, "180.00") as (_quota, billing):
        await billing.calls.create_account(ACCOUNT)
        await billing.calls.create_account("someone-else")
        await expect_error(
            recommend(billing, months=13), grpc.StatusCode.INVALID_ARGUMENT, field="months"
        )
        await expect_error(
            recommend(billing, account_id="nobody"),
            grpc.StatusCode.NOT_FOUND,
            reason="ACCOUNT_NOT_FOUND",
        )
        await expect_error(
            recommend(
                billing,
                metadata=billing.calls.tokens.md(billing.calls.tokens.account("someone-else")),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        # The account's own token, no usage: pay-per-use alone, costing nothing.
        own = await recommend(
            billing, metadata=billing.calls.tokens.md(billing.calls.tokens.account(ACCOUNT))
        )
        assert mixes(own) == [((), 0)]
        assert micros(own.actual_cost) == 0
        assert own.end_time.ToDatetime() - own.start_time.ToDatetime() == timedelta(days=365)


async def test_actual_cost_counts_packages_bought_and_pay_per_use(quota_and_billing_urls, tmp_path):
    async with suite(quota_and_billing_urls, tmp_path, "180.00") as (quota, billing):
        calls = QuotaCalls(quota)
        await billing.calls.create_account(ACCOUNT)
        await billing.calls.top_up(ACCOUNT, "100")
        at = local("2024-01-01 08:00")
        order = await billing.calls.purchase(ACCOUNT, "passport-10k-1y", HK, "buy-10k", 10)
        assert order.package_id
        # 12,500 calls: the 10k package pays 10,000, 2,500 are pay-per-use (6.25).
        await calls.report("use", ACCOUNT, MONTHLY_CALLS, occur=at)
        end = local("2024-01-20 08:00")
        await calls.set_time(end)
        await billing.caught_up_with(quota)
        await billing.calls.set_time(end)
        answer = await recommend(billing, months=1)

    assert micros(answer.actual_cost) == dollars("30.00") + dollars("6.25")
    # The replay ignores the real package: 12,500 calls to place.
    alone = next(c for c in answer.candidates if not c.offers)
    assert alone.pay_per_use_quantity == MONTHLY_CALLS
    assert micros(alone.expected_cost) == dollars("31.25")
    # Pay-per-use alone (31.25) beats one 10k package and the rest (30 + 6.25) and two (60).
    assert mixes(answer) == [
        ((), dollars("31.25")),
        ((("passport-10k-1y", 1),), dollars("36.25")),
        ((("passport-10k-1y", 2),), dollars("60.00")),
        ((("passport-100k-1y", 1),), dollars("180.00")),
    ]
