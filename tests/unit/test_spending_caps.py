"""The pure rules of spending caps (docs/design/spending-cap.md): the month of an instant in the
billing time zone, the pay-per-use part of a call, the price as billing rates it, admission's
SPENDING_CAP, and billing's settled figures of other regions."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from services.quota.adapters.subscriptions_repository import settled_elsewhere
from services.quota.domain.admission import DenyReason, Standing, admit
from services.quota.domain.spending_caps import (
    pay_per_use_part,
    pay_per_use_price,
)
from shared.catalog import PriceTier
from shared.validity import month_key

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_the_month_is_the_billing_time_zones():
    # 2024-05-31 16:00 UTC is 2024-06-01 00:00 in Shanghai.
    assert month_key(datetime(2024, 5, 31, 15, 59, 59, tzinfo=UTC), SHANGHAI) == "2024-05"
    assert month_key(datetime(2024, 5, 31, 16, 0, 0, tzinfo=UTC), SHANGHAI) == "2024-06"
    assert month_key(datetime(2024, 12, 31, 16, 0, tzinfo=UTC), SHANGHAI) == "2025-01"


@pytest.mark.parametrize(
    ("remaining", "quantity", "part"), [(0, 1, 1), (5, 3, 0), (2, 5, 3), (-1, 2, 2)]
)
def test_the_pay_per_use_part_is_what_packages_do_not_cover(remaining, quantity, part):
    assert pay_per_use_part(remaining, quantity) == part


def test_calls_are_priced_as_billing_rates_them():
    tiers = (PriceTier(up_to=10, unit_price=Decimal("0.10")), PriceTier(None, Decimal("0.05")))
    # 3 free calls, then tier 1 up to call 10, then tier 2.
    assert pay_per_use_price(tiers, 3, 0, 3) == 0
    assert pay_per_use_price(tiers, 3, 0, 4) == 100_000
    assert pay_per_use_price(tiers, 3, 9, 2) == 100_000 + 50_000
    # Any split of the month's calls costs the same as pricing them at once.
    once = pay_per_use_price(tiers, 3, 0, 25)
    split = sum(pay_per_use_price(tiers, 3, used, 5) for used in range(0, 25, 5))
    assert once == split == 7 * 100_000 + 15 * 50_000


def base(**overrides):
    values = {
        "subscribed": True,
        "standing": Standing.GOOD,
        "remaining_quantity": 0,
        "quantity": 1,
        "spending_cap_micros": 1_000_000,
        "month_spend_micros": 1_000_000,
    }
    values.update(overrides)
    return admit(**values)


def test_admission_denies_pay_per_use_at_the_cap_only():
    assert base().deny_reason == DenyReason.SPENDING_CAP
    assert not base().allowed
    # Below the cap, with no cap, or covered by packages: allowed.
    assert base(month_spend_micros=999_999).allowed
    assert base(spending_cap_micros=0).allowed
    assert base(remaining_quantity=1).allowed
    # Other reasons come first.
    assert base(subscribed=False).deny_reason == DenyReason.API_NOT_SUBSCRIBED
    assert base(standing=Standing.FROZEN).deny_reason == DenyReason.ACCOUNT_FROZEN
    blocked = base(standing=Standing.GRACE, block_pay_per_use_in_grace=True)
    assert blocked.deny_reason == DenyReason.PAY_PER_USE_BLOCKED


def test_settled_charges_count_for_other_regions_of_the_month_only():
    text = '{"month": "2024-05", "regions": {"a": 100, "b": 250}}'
    assert settled_elsewhere(text, "2024-05", ("a",)) == 250
    assert settled_elsewhere(text, "2024-05", ()) == 350
    assert settled_elsewhere(text, "2024-06", ()) == 0
    assert settled_elsewhere("", "2024-05", ()) == 0
