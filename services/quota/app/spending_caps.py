"""Monthly pay-per-use spending caps: counting the month's pay-per-use as it is recorded, and
the capped admission of CheckQuota (docs/design/spending-cap.md).

- `after_usage` runs inside the usage transaction: each recorded pay-per-use call is added to
  its account's month (billing time zone, by occur_time), region and API in
  `pay_per_use_months`, priced by the catalog's tiers after the month's earlier calls exactly as
  billing rates it (`shared/pricing.py`). Always, capped or not: a cap set mid-month counts the
  month from its first call.
- `apply` runs after `domain/admission.admit` (which already refused a call once the month's
  counted spend, or what admission let through, reached the cap, with no extra statement): a
  pay-per-use call of a capped account that is still below the cap runs one atomic statement
  that adds its price to what admission let through this month, or refuses it if a
  concurrent call took the last room (`adapters/spending_repository.admit`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

from services.quota.adapters import spending_repository as repo
from services.quota.adapters.subscriptions_repository import AdmissionFacts, settled_elsewhere
from services.quota.app.context import QuotaContext
from services.quota.domain.admission import Admission, DenyReason
from services.quota.domain.spending_caps import pay_per_use_part, pay_per_use_price
from shared.db import UnitOfWork
from shared.validity import month_key


def _price(ctx: QuotaContext, region: str, api: str, used_before: int, quantity: int) -> int:
    info = ctx.catalog.apis[api]
    return pay_per_use_price(
        info.tiers_for(region), info.free_monthly_quantity, used_before, quantity
    )


async def after_usage(ctx: QuotaContext, uow: UnitOfWork, recorded: Iterable[tuple]) -> None:
    """Count recorded pay-per-use: `recorded` holds (usage event, pay-per-use calls). Rows are
    taken in key order, so two batches never wait on each other's rows crosswise."""
    months: dict[repo.MonthKey, int] = defaultdict(int)
    for event, quantity in recorded:
        if quantity > 0:
            month = month_key(event.occur_time, ctx.tz)
            months[(event.account_id, month, event.region, event.api)] += quantity
    for key in sorted(months):
        used = await repo.month_quantity_for_update(uow, key)
        price = _price(ctx, key[2], key[3], used or 0, months[key])
        await repo.add_month(uow, key, months[key], price, new=used is None)


def month_spend(ctx: QuotaContext, facts: AdmissionFacts) -> int:
    """The account's pay-per-use of the month as admission counts it (0 without a cap, which
    needs no count): what this database recorded, priced, plus billing's settled charges of
    the regions this process does not serve."""
    if facts.cap_micros <= 0:
        return 0
    return facts.spent_micros + settled_elsewhere(facts.settled, facts.month, ctx.served_regions)


async def apply(
    ctx: QuotaContext,
    key: tuple[str, str, str],
    facts: AdmissionFacts,
    admission: Admission,
    quantity: int,
    spent_micros: int,
) -> Admission:
    """The admission under the account's spending cap: only an admitted pay-per-use call of a
    capped account pays a statement; it takes its price from the month's room or is denied
    SPENDING_CAP."""
    if not admission.allowed or not admission.pay_per_use or facts.cap_micros <= 0:
        return admission
    account_id, region, api = key
    part = pay_per_use_part(facts.remaining, quantity)
    price = _price(ctx, region, api, facts.used_quantity, part)
    month = facts.month or month_key(ctx.now(), ctx.tz)

    async def work(uow: UnitOfWork) -> tuple[bool, int]:
        return await repo.admit(uow, account_id, month, spent_micros, price, facts.cap_micros)

    admitted, _ = await ctx.db.transaction(work)
    if admitted:
        return admission
    return dataclasses.replace(admission, allowed=False, deny_reason=DenyReason.SPENDING_CAP)
