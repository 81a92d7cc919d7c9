"""Graduated pay-per-use pricing (docs/design/billing.md, "Pay-per-use")."""

from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.cycles import month_key
from shared.catalog import PriceTier
from shared.money import MoneyError, to_micros
from shared.pricing import (
    Priced,
    TierCharge,
    merge_priced,
    price_usage,
    validate_tiers,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
PLUS_8 = timezone(timedelta(hours=8))
T = 1_000
TIERS = (
    PriceTier(up_to=T, unit_price=Decimal("0.0025")),
    PriceTier(up_to=None, unit_price=Decimal("0.0020")),
)


def test_the_call_that_makes_t_plus_1_in_a_month_is_priced_at_tier_2():
    assert price_usage(TIERS, 0, T - 1, 1) == Priced(
        2_500, 0, (TierCharge(1, 1, Decimal("0.0025"), 2_500),)
    )
    assert price_usage(TIERS, 0, T, 1) == Priced(
        2_000, 0, (TierCharge(2, 1, Decimal("0.0020"), 2_000),)
    )


def test_the_first_call_of_the_next_month_in_the_billing_time_zone_is_tier_1_again():
    # The caller keeps the month's pay-per-use count per account/region/API, by month of the
    # billing time zone; the new month starts at zero.
    counts: Counter[str] = Counter()
    calls = [datetime(2024, 4, 30, 23, 0, tzinfo=PLUS_8)] * (T + 1) + [
        datetime(2024, 5, 1, 0, 0, 10, tzinfo=PLUS_8),  # 2024-04-30 16:00:10 UTC
    ]
    prices = []
    for t in calls:
        month = month_key(t, SHANGHAI)
        prices.append(price_usage(TIERS, 0, counts[month], 1))
        counts[month] += 1

    assert prices[T - 1].tiers[0].tier == 1
    assert prices[T].tiers[0].tier == 2
    assert prices[T + 1].tiers[0].tier == 1
    assert counts == {"2024-04": T + 1, "2024-05": 1}


def test_a_run_that_crosses_a_tier_boundary_is_split():
    priced = price_usage(TIERS, 0, T - 2, 5)

    assert priced.tiers == (
        TierCharge(1, 2, Decimal("0.0025"), 5_000),
        TierCharge(2, 3, Decimal("0.0020"), 6_000),
    )
    assert priced.price_micros == 11_000
    assert priced.quantity == 5


def test_the_free_allowance_is_used_before_tier_1():
    priced = price_usage(TIERS, 100, 0, 150)

    assert priced.free_quantity == 100
    assert priced.tiers == (TierCharge(1, 50, Decimal("0.0025"), 125_000),)
    assert price_usage(TIERS, 100, 99, 1) == Priced(0, 1, ())
    assert price_usage(TIERS, 100, 100, 1).tiers[0].tier == 1


def test_free_calls_count_towards_the_tiers_up_to():
    # up_to counts every pay-per-use call of the month, the free ones included.
    priced = price_usage(TIERS, 100, 0, T + 1)

    assert priced.free_quantity == 100
    assert [(c.tier, c.quantity) for c in priced.tiers] == [(1, T - 100), (2, 1)]


def test_a_free_allowance_larger_than_tier_1_swallows_it():
    priced = price_usage(TIERS, 1_500, 0, 1_600)

    assert priced.free_quantity == 1_500
    assert priced.tiers == (TierCharge(2, 100, Decimal("0.0020"), 200_000),)


def test_package_paid_calls_never_count_towards_tiers():
    # A month of 5,000 package-paid calls followed by pay-per-use: the caller passes only the
    # pay-per-use count (0), so the first pay-per-use call is tier 1.
    package_paid, pay_per_use_before = 5_000, 0
    assert package_paid > T
    assert price_usage(TIERS, 0, pay_per_use_before, 1).tiers[0].tier == 1


def test_three_tiers_and_a_long_run():
    tiers = (
        PriceTier(10, Decimal("1")),
        PriceTier(20, Decimal("0.5")),
        PriceTier(None, Decimal("0.25")),
    )

    priced = price_usage(tiers, 5, 0, 30)

    assert priced.free_quantity == 5
    assert [(c.tier, c.quantity, c.price_micros) for c in priced.tiers] == [
        (1, 5, 5_000_000),
        (2, 10, 5_000_000),
        (3, 10, 2_500_000),
    ]
    assert priced.price_micros == 12_500_000


def test_amounts_are_exact_micros():
    tiers = (PriceTier(None, Decimal("0.000001")),)
    assert price_usage(tiers, 0, 0, 3).price_micros == 3
    # 3 calls at 0.0025 cost 0.0075 exactly: rounding to cents is settlement's business.
    assert price_usage(TIERS, 0, 0, 3).price_micros == 7_500


def test_a_unit_price_with_more_than_six_decimals_is_refused():
    tiers = (PriceTier(None, Decimal("0.0000001")),)
    with pytest.raises(MoneyError, match="tier 1"):
        price_usage(tiers, 0, 0, 10)


def test_zero_calls_cost_nothing():
    assert price_usage(TIERS, 10, 5, 0) == Priced(0, 0, ())


@pytest.mark.parametrize(
    "tiers",
    [
        (),
        (PriceTier(10, Decimal("1")),),  # the last tier must be open-ended
        (PriceTier(None, Decimal("1")), PriceTier(None, Decimal("1"))),
        (PriceTier(10, Decimal("1")), PriceTier(10, Decimal("1")), PriceTier(None, Decimal("1"))),
        (PriceTier(0, Decimal("1")), PriceTier(None, Decimal("1"))),
        (PriceTier(None, Decimal("-0.01")),),
    ],
)
def test_malformed_tiers_are_refused(tiers):
    with pytest.raises(ValueError):
        validate_tiers(tiers)
    with pytest.raises(ValueError):
        price_usage(tiers, 0, 0, 1)


@pytest.mark.parametrize(("free", "used_before", "quantity"), [(-1, 0, 1), (0, -1, 1), (0, 0, -1)])
def test_negative_counts_are_refused(free, used_before, quantity):
    with pytest.raises(ValueError):
        price_usage(TIERS, free, used_before, quantity)


def test_counts_must_be_ints():
    with pytest.raises(TypeError):
        price_usage(TIERS, 0, 0, 1.0)
    with pytest.raises(TypeError):
        price_usage(TIERS, 0, True, 1)


def test_merge_adds_tiers_and_free_calls():
    parts = [price_usage(TIERS, 2, 0, 1), price_usage(TIERS, 2, 1, 5), price_usage(TIERS, 2, 6, 1)]

    assert merge_priced(parts) == price_usage(TIERS, 2, 0, 7)
    assert merge_priced([]) == Priced(0, 0, ())


def test_merge_refuses_one_tier_at_two_prices():
    other = (PriceTier(None, Decimal("0.003")),)
    with pytest.raises(ValueError, match="tier 1"):
        merge_priced([price_usage(TIERS, 0, 0, 1), price_usage(other, 0, 0, 1)])


# --- properties -----------------------------------------------------------------------------

unit_prices = st.decimals(min_value=0, max_value=10, places=6, allow_nan=False)


@st.composite
def tier_lists(draw):
    bounds = sorted(draw(st.sets(st.integers(1, 300), max_size=3)))
    prices = draw(st.lists(unit_prices, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    return tuple(
        PriceTier(up_to, price) for up_to, price in zip([*bounds, None], prices, strict=True)
    )


def _price_of_call(tiers, free, number):
    """The reference rule, call by call: free, else the first tier whose up_to reaches it."""
    if number <= free:
        return None
    for index, tier in enumerate(tiers, start=1):
        if tier.up_to is None or number <= tier.up_to:
            return index, tier.unit_price
    raise AssertionError("the last tier is open-ended")


@given(
    tier_lists(),
    st.integers(0, 200),
    st.lists(st.integers(0, 120), max_size=12),
)
def test_pricing_in_chunks_equals_pricing_at_once(tiers, free, chunks):
    """Exact additivity: a month's calls priced in arbitrary chunks (events, cycles, retries
    after a restart) cost exactly what they cost priced at once, tier by tier."""
    used = 0
    parts = []
    for size in chunks:
        parts.append(price_usage(tiers, free, used, size))
        used += size

    at_once = price_usage(tiers, free, 0, used)

    assert merge_priced(parts) == at_once
    assert sum(p.price_micros for p in parts) == at_once.price_micros
    assert at_once.quantity == used


@given(tier_lists(), st.integers(0, 200), st.integers(0, 400), st.integers(0, 150))
def test_pricing_agrees_with_the_call_by_call_rule(tiers, free, used_before, quantity):
    expected_free = 0
    by_tier: Counter[int] = Counter()
    amount = 0
    for number in range(used_before + 1, used_before + quantity + 1):
        price = _price_of_call(tiers, free, number)
        if price is None:
            expected_free += 1
        else:
            by_tier[price[0]] += 1
            amount += to_micros(price[1])

    priced = price_usage(tiers, free, used_before, quantity)

    assert priced.free_quantity == expected_free
    assert {c.tier: c.quantity for c in priced.tiers} == dict(by_tier)
    assert priced.price_micros == amount
