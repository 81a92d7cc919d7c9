"""Monthly pay-per-use spending caps in admission: the pure rules (docs/design/spending-cap.md).

Billing owns the cap (SetSpendingCap) and carries it to quota in account_standing_changed.
Quota counts, per account and calendar month of the billing time zone, what its pay-per-use
costs, priced by the catalog's tiers exactly as billing rates it (`shared/pricing.py`), and
what admission has already let through (`admitted`): a capped pay-per-use call is admitted
only while the larger of the two is below the cap (`domain/admission.admit` with the larger
as `month_spend_micros`), and then adds its own price to `admitted` in one atomic statement
(`adapters/spending_repository.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.catalog import PriceTier
from shared.pricing import price_usage


def pay_per_use_price(
    tiers: Sequence[PriceTier], free_monthly_quantity: int, used_before: int, quantity: int
) -> int:
    """Micros that `quantity` pay-per-use calls cost after `used_before` earlier ones of the
    month (same account, region and API): billing's graduated rule, exact, unrounded."""
    return price_usage(tiers, free_monthly_quantity, used_before, quantity).price_micros


def pay_per_use_part(remaining_quantity: int, quantity: int) -> int:
    """The calls of a call of `quantity` that packages with `remaining_quantity` left do not
    cover: those pay-per-use would pay."""
    return max(0, quantity - max(0, remaining_quantity))
