"""Package recommendations: which mixes of offers to try, how a mix is laid out in time, and
what it costs (docs/design/what-if.md, "Recommendations").

A *mix* is a set of (offer, count) pairs, or nothing (pay-per-use only). It is laid out over
the window [start, end): its packages are bought at the window's start and bought again
whenever the previous ones expire before the window ends. Its outcome (calls paid by packages,
pay-per-use calls per month, calls forfeited) comes from quota's replay; its cost is the offers'
prices for every purchase plus each month's pay-per-use calls priced at the catalog's tiers
(`pricing.price_usage`, the one pricing; each month of the window from call 1).

Which mixes: pay-per-use only; each offer alone in the counts that come nearest to the window's
billable calls U from below and from above (floor and ceiling of U / quantity, at least 1, at
most MAX_COUNT); and each pair of offers where the larger fills floor(U / larger) and the
smaller covers the rest. At most MAX_MIXES mixes, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.catalog import Api, Offer
from shared.money import to_micros
from shared.pricing import price_usage
from shared.validity import package_expire_time

MAX_COUNT = 20
MAX_MIXES = 24
ONE_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class MixPart:
    offer: Offer
    count: int


@dataclass(frozen=True)
class Mix:
    """Offers bought together; empty parts = pay-per-use only."""

    parts: tuple[MixPart, ...]

    @property
    def key(self) -> tuple:
        return tuple((p.offer.id, p.count) for p in self.parts)


@dataclass(frozen=True)
class Purchase:
    """`count` packages of `offer` bought at `start`."""

    offer: Offer
    count: int
    start: datetime


@dataclass(frozen=True)
class SimulatedOutcome:
    """Quota's replay of a mix (SimulateUsage)."""

    package_paid_quantity: int
    pay_per_use_quantity: int
    forfeited_quantity: int
    # Pay-per-use calls per calendar month, oldest first.
    monthly_pay_per_use: tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    mix: Mix
    # Purchases of each part of the mix, in the mix's order.
    purchases: tuple[int, ...]
    package_cost_micros: int
    pay_per_use_cost_micros: int
    outcome: SimulatedOutcome

    @property
    def expected_cost_micros(self) -> int:
        return self.package_cost_micros + self.pay_per_use_cost_micros

    @property
    def package_count(self) -> int:
        return sum(p.count * n for p, n in zip(self.mix.parts, self.purchases, strict=True))


def candidate_mixes(offers: Sequence[Offer], billable: int) -> list[Mix]:
    """The mixes to replay for `billable` calls in the window (the module docstring)."""
    mixes: list[Mix] = [Mix(())]
    seen = {()}

    def add(*parts: MixPart) -> None:
        mix = Mix(tuple(sorted(parts, key=lambda p: -p.offer.quantity)))
        if mix.key not in seen and len(mixes) < MAX_MIXES:
            seen.add(mix.key)
            mixes.append(mix)

    if billable <= 0:
        return mixes
    by_size = sorted(offers, key=lambda o: (-o.quantity, o.id))
    for offer in by_size:
        low, high = billable // offer.quantity, -(-billable // offer.quantity)
        for count in sorted({low, high}):
            if 1 <= count <= MAX_COUNT:
                add(MixPart(offer, count))
    for i, large in enumerate(by_size):
        filled = billable // large.quantity
        if not 1 <= filled <= MAX_COUNT:
            continue
        rest = billable - filled * large.quantity
        for small in by_size[i + 1 :]:
            count = -(-rest // small.quantity)
            if rest > 0 and 1 <= count <= MAX_COUNT:
                add(MixPart(large, filled), MixPart(small, count))
    return mixes


def layout(mix: Mix, start: datetime, end: datetime, tz: ZoneInfo) -> list[list[Purchase]]:
    """Each part's purchases: at `start`, then one second after the previous ones' expiry
    while that is before `end`."""
    laid: list[list[Purchase]] = []
    for part in mix.parts:
        purchases, at = [], start
        while at < end:
            purchases.append(Purchase(part.offer, part.count, at))
            at = package_expire_time(at, part.offer.validity_months, tz) + ONE_SECOND
        laid.append(purchases)
    return laid


def cost(
    mix: Mix, laid: Sequence[Sequence[Purchase]], outcome: SimulatedOutcome, api: Api, region: str
) -> Candidate:
    """A mix priced: offer prices for every purchase, pay-per-use month by month."""
    package_micros = sum(
        to_micros(p.offer.price) * p.count for purchases in laid for p in purchases
    )
    tiers = api.tiers_for(region)
    pay_per_use_micros = sum(
        price_usage(tiers, api.free_monthly_quantity, 0, quantity).price_micros
        for quantity in outcome.monthly_pay_per_use
    )
    return Candidate(
        mix=mix,
        purchases=tuple(len(purchases) for purchases in laid),
        package_cost_micros=package_micros,
        pay_per_use_cost_micros=pay_per_use_micros,
        outcome=outcome,
    )


def ranked(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Cheapest first; on a tie fewer packages, then by the mix's offers."""
    return sorted(candidates, key=lambda c: (c.expected_cost_micros, c.package_count, c.mix.key))
