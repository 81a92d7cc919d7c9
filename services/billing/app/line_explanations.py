"""ExplainBillLine: the usage events of a pay-per-use bill line, each explained by its
region's quota service and completed with billing's record of the packages it sold in other
regions (docs/design/billing.md, "Explaining a pay-per-use line"; the rule of the merge is
`domain/line_explanations.py`).

The events are billing's own record (``pay_per_use_events``, written by the intake with each
``pay_per_use_recorded`` event). Quota is asked for at most MAX_CONCURRENT explanations at a
time, each within READ_TIMEOUT and all within PAGE_DEADLINE: an event quota does not explain
in time is answered unavailable, with billing's near misses alone. Never a hang, never an
error for a quota that is down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from services.billing.adapters import packages_repository as sold_repo
from services.billing.adapters import usage_repository as usage_repo
from services.billing.adapters.quota_client import READ_TIMEOUT
from services.billing.app.accounts import load_account
from services.billing.app.bills import check_month
from services.billing.app.context import BillingContext
from services.billing.domain.cycles import cycle_start, month_key
from services.billing.domain.line_explanations import Explained, LineEvent, line_event
from services.billing.domain.usage import RecordedUsage
from shared.errors import AllotError, InvalidArgument, NotFound
from shared.timeutil import to_epoch_us
from shared.validation import check_account_id

log = logging.getLogger("allot.billing.line_explanations")

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Quota calls in flight at once for one page, and the time one page may take as a whole.
MAX_CONCURRENT = 8
PAGE_DEADLINE = 10.0


@dataclass(frozen=True)
class LineQuery:
    account_id: str
    month: str
    cycle_start_time: datetime
    region: str
    api: str
    # Regions whose sold packages may be shown (those of the caller's token).
    visible_regions: tuple[str, ...]


def line_page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size", "page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _check(ctx: BillingContext, query: LineQuery) -> None:
    check_account_id(query.account_id)
    check_month(query.month, ctx.tz)
    ctx.check_region(query.region)
    ctx.check_api(query.api)
    start = query.cycle_start_time
    if cycle_start(start, ctx.tz) != start:
        raise InvalidArgument("cycle_start_time", "cycle_start_time is not the start of a cycle")
    if month_key(start, ctx.tz) != query.month:
        raise InvalidArgument("cycle_start_time", "cycle_start_time is not in the month")


async def explain_line(
    ctx: BillingContext, query: LineQuery, after_id: str | None, limit: int
) -> tuple[list[LineEvent], bool]:
    """One page of the line's events, explained, and whether more follow."""
    _check(ctx, query)
    start_us = to_epoch_us(query.cycle_start_time)
    others = [r for r in query.visible_regions if r != query.region]

    async def read(uow):
        await load_account(uow, query.account_id)
        if not await usage_repo.line_exists(
            uow, query.account_id, query.region, query.api, start_us
        ):
            raise NotFound(
                "BILL_LINE_NOT_FOUND",
                "no pay-per-use of this account, region and API in that cycle",
                account_id=query.account_id,
                region=query.region,
                api=query.api,
            )
        events = await usage_repo.line_events(
            uow, query.account_id, query.region, query.api, start_us, after_id, limit + 1
        )
        if not events[:limit]:
            return events, []
        times = [e.occur_time for e in events[:limit]]
        sold = await sold_repo.sold_in_force(
            uow, query.account_id, query.api, others, min(times), max(times)
        )
        return events, sold

    events, sold = await ctx.db.read(read)
    page = events[:limit]
    explained = await _explain_all(ctx, page)
    answered = [line_event(u, x, sold) for u, x in zip(page, explained, strict=True)]
    return answered, len(events) > limit


async def _explain_all(ctx: BillingContext, page: list[RecordedUsage]) -> list[Explained | None]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PAGE_DEADLINE
    gate = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(usage: RecordedUsage) -> Explained | None:
        async with gate:
            left = min(READ_TIMEOUT, deadline - loop.time())
            if left <= 0:
                return None
            try:
                return await ctx.quota.explain_usage(usage.region, usage.usage_event_id, left)
            except AllotError as error:
                log.warning(
                    "usage event %s of %s: no explanation from quota (%s)",
                    usage.usage_event_id,
                    usage.region,
                    error,
                )
                return None

    return list(await asyncio.gather(*(one(u) for u in page)))
