"""Graduated pay-per-use pricing: what a run of calls costs, given the month's earlier calls.

One rule for the suite: billing rates its hourly cycles with it, quota counts a month's
pay-per-use with it for spending caps (docs/design/spending-cap.md).

The rule (docs/design/billing.md)
=================================

The pay-per-use calls of one account, region and API in one calendar month of the billing time
zone are numbered 1, 2, 3, ... in the order they are rated. Package-paid calls are not numbered
at all: the caller passes pay-per-use counts only, so packages never move an account up a tier.
Each call's price depends on its number alone:

- calls numbered up to the API's ``free_monthly_quantity`` are free;
- any other call is priced at the first tier whose ``up_to`` is at least its number, or at the
  last tier (which has no ``up_to``) when none is.

So ``up_to`` counts every pay-per-use call of the month, the free ones included: with 1,000 free
calls and tier 1 up to 1,000,000, calls 1,001 to 1,000,000 are tier 1 and call 1,000,001 is
tier 2. A free allowance larger than a tier's ``up_to`` swallows that tier. Example from the
issue: with tier 1 up to T calls, the call that makes T+1 in a month is priced at tier 2; the
first call of the next month is number 1 again, so tier 1 (or free).

``price_usage`` prices ``quantity`` calls numbered ``used_before + 1`` to
``used_before + quantity``. Because every call has one price fixed by its number, pricing a
month's calls in chunks, in any split, gives exactly what pricing them at once gives
(``merge_priced`` adds the parts back together). The amount is exact: unit prices have at most
six decimals, so a price in micro-units is an integer and so is quantity × price. A unit price
with more decimals raises ``MoneyError`` instead of being rounded; rounding to the currency's
minor unit is settlement's business (``bills.pay_per_use_line``), once per hourly cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from shared.catalog import PriceTier
from shared.money import MoneyError, to_micros

__all__ = ["Priced", "TierCharge", "merge_priced", "price_usage", "validate_tiers"]


@dataclass(frozen=True)
class TierCharge:
    """``quantity`` calls priced at tier number ``tier`` (1-based), exactly."""

    tier: int
    quantity: int
    unit_price: Decimal
    price_micros: int


@dataclass(frozen=True)
class Priced:
    """The price of a run of calls: the free ones, and the charged ones by tier, in tier order.

    ``price_micros`` is exact (not rounded to the currency's minor unit) and equals the sum of
    the tiers' prices. Tiers with no calls are left out.
    """

    price_micros: int
    free_quantity: int
    tiers: tuple[TierCharge, ...]

    def __post_init__(self) -> None:
        if self.price_micros != sum(t.price_micros for t in self.tiers):
            raise ValueError("price_micros must be the sum of the tiers' prices")
        numbers = [t.tier for t in self.tiers]
        if numbers != sorted(set(numbers)):
            raise ValueError("tier charges must be in tier order, each tier once")

    @property
    def quantity(self) -> int:
        """All calls priced, the free ones included."""
        return self.free_quantity + sum(t.quantity for t in self.tiers)


def validate_tiers(tiers: Sequence[PriceTier]) -> None:
    """Check that ``tiers`` can price any call; raise ``ValueError``/``MoneyError`` otherwise.

    Every tier but the last has a positive ``up_to``, strictly increasing; the last has none;
    unit prices are non-negative with at most six decimals. The catalog loader checks the shape
    too; this guards the pricing arithmetic wherever the tiers come from.
    """
    if not tiers:
        raise ValueError("a price needs at least one tier")
    previous = 0
    for number, tier in enumerate(tiers, start=1):
        is_last = number == len(tiers)
        if is_last != (tier.up_to is None):
            raise ValueError(
                f"tier {number}: only the last tier, and always the last, has no up_to"
            )
        if tier.up_to is not None and tier.up_to <= previous:
            raise ValueError(f"tier {number}: up_to {tier.up_to} must exceed {previous}")
        if tier.unit_price < 0:
            raise ValueError(f"tier {number}: unit price {tier.unit_price} is negative")
        try:
            to_micros(tier.unit_price)
        except MoneyError as exc:
            raise MoneyError(f"tier {number}: unit price {tier.unit_price}: {exc}") from None
        previous = tier.up_to or previous


def price_usage(
    tiers: Sequence[PriceTier],
    free_monthly_quantity: int,
    used_before: int,
    quantity: int,
) -> Priced:
    """Price ``quantity`` pay-per-use calls after ``used_before`` earlier ones this month.

    ``used_before`` counts the account's pay-per-use calls of this region and API earlier in
    the same calendar month (billing time zone), free ones included, package-paid ones never.
    ``quantity`` 0 prices nothing.
    """
    for name, value in (
        ("free_monthly_quantity", free_monthly_quantity),
        ("used_before", used_before),
        ("quantity", quantity),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    validate_tiers(tiers)

    last = used_before + quantity  # the number of the last call priced
    free = max(0, min(last, free_monthly_quantity) - used_before)
    done = used_before + free  # calls up to this number are priced (or free)
    charges: list[TierCharge] = []
    lower = 0  # the previous tier's up_to
    for number, tier in enumerate(tiers, start=1):
        upper = last if tier.up_to is None else min(tier.up_to, last)
        count = upper - max(lower, done)
        if count > 0:
            amount = count * to_micros(tier.unit_price)
            charges.append(TierCharge(number, count, tier.unit_price, amount))
        if tier.up_to is None or tier.up_to >= last:
            break
        lower = tier.up_to
    return Priced(
        price_micros=sum(c.price_micros for c in charges),
        free_quantity=free,
        tiers=tuple(charges),
    )


def merge_priced(parts: Iterable[Priced]) -> Priced:
    """Add prices of runs of calls together (the events of one hourly cycle, say).

    Charges of the same tier are added; they must agree on the unit price, which they do when
    they were priced from the same tiers. No parts give an empty ``Priced``.
    """
    free = 0
    by_tier: dict[int, TierCharge] = {}
    for part in parts:
        free += part.free_quantity
        for charge in part.tiers:
            seen = by_tier.get(charge.tier)
            if seen is None:
                by_tier[charge.tier] = charge
                continue
            if seen.unit_price != charge.unit_price:
                raise ValueError(
                    f"tier {charge.tier} is priced at both {seen.unit_price}"
                    f" and {charge.unit_price}"
                )
            by_tier[charge.tier] = TierCharge(
                charge.tier,
                seen.quantity + charge.quantity,
                seen.unit_price,
                seen.price_micros + charge.price_micros,
            )
    charges = tuple(by_tier[number] for number in sorted(by_tier))
    return Priced(sum(c.price_micros for c in charges), free, charges)
