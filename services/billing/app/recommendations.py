"""Use case of RecommendPackages (docs/design/what-if.md, "Recommendations"). Read-only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from services.billing.adapters import ledger_repository as ledger_repo
from services.billing.app.accounts import load_account
from services.billing.app.context import BillingContext
from services.billing.domain.recommendations import (
    Candidate,
    candidate_mixes,
    cost,
    layout,
    ranked,
)
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.validity import add_months

MAX_MONTHS = 12
# Replays asked of quota at once.
CONCURRENT_REPLAYS = 4


@dataclass(frozen=True)
class Recommendation:
    candidates: tuple[Candidate, ...]
    actual_cost_micros: int
    currency: str
    start: datetime
    end: datetime


def window(now: datetime, months: int, ctx: BillingContext) -> tuple[datetime, datetime]:
    """The last `months` calendar months up to `now`: the same local time `months` earlier."""
    local = now.astimezone(ctx.tz)
    day = add_months(local.date(), -months)
    start = datetime.combine(day, local.timetz()).astimezone(UTC)
    return start, now


async def recommend_packages(
    ctx: BillingContext, account_id: str, region: str, api: str, months: int
) -> Recommendation:
    ctx.check_region(region)
    ctx.check_api(api)
    months = months or MAX_MONTHS
    if not 1 <= months <= MAX_MONTHS:
        raise InvalidArgument("months", f"months must be between 1 and {MAX_MONTHS}")
    start, end = window(ctx.now(), months, ctx)

    async def read(uow: UnitOfWork) -> tuple[str, int]:
        account = await load_account(uow, account_id)
        charged = await ledger_repo.charged_for(uow, account_id, region, api, start, end)
        return account.currency_code, charged

    currency, actual = await ctx.db.read(read)
    catalog_api = ctx.catalog.apis[api]
    offers = ctx.catalog.offers_for(api, region)

    async def replay(purchases):
        return await ctx.quota.simulate_usage(
            region, account_id=account_id, api=api, start=start, end=end, purchases=purchases
        )

    # Pay-per-use only: every billable call of the window, which sizes the mixes.
    alone = await replay([])
    mixes = candidate_mixes(offers, alone.pay_per_use_quantity)
    gate = asyncio.Semaphore(CONCURRENT_REPLAYS)

    async def costed(mix) -> Candidate:
        laid = layout(mix, start, end, ctx.tz)
        purchases = [p for part in laid for p in part]
        if not purchases:
            return cost(mix, laid, alone, catalog_api, region)
        async with gate:
            outcome = await replay(purchases)
        return cost(mix, laid, outcome, catalog_api, region)

    # A failed replay cancels the others (TaskGroup) and fails the call with its error.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(costed(mix)) for mix in mixes]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    candidates = [task.result() for task in tasks]
    return Recommendation(tuple(ranked(candidates)), actual, currency, start, end)
