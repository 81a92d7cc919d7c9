"""The console's account-wide views: GetAccountOverview and ListAccountPackages
(docs/design/billing.md, "Account overview").

Quota is regional and billing global, so billing asks every region's quota service and merges.
Each region is read concurrently and within READ_TIMEOUT as a whole (all its pages); a region
that fails or does not answer in time is reported unavailable and the rest is answered: a
partial answer, never a hang and never an error. Billing's own figures (the account, this
month's pay-per-use) and notification's answer (who hears usage alerts) complete the view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.billing.adapters.month_usage import month_usage
from services.billing.adapters.quota_client import IN_FORCE_STATES, READ_TIMEOUT
from services.billing.app.accounts import load_account
from services.billing.app.context import BillingContext
from services.billing.domain.cycles import month_bounds, month_key
from services.billing.domain.overview import (
    AccountOverview,
    AlertSeen,
    PackageSeen,
    region_figures,
    unheard_alerts,
)
from shared.errors import AllotError, InvalidArgument

log = logging.getLogger("allot.billing.overview")

# Pages of one region read for the overview (1,000 items each); an account with more packages
# in force in one region is summed over the first ones and the rest is logged.
MAX_PAGES = 20
_PAGE = 1000


class _Late(Exception):
    """The region's time is up."""


async def _all_pages(
    read: Callable[[str, float], Awaitable[tuple[list, str]]], deadline: float
) -> list:
    """Every page of a quota listing, each call given what is left of ``deadline``."""
    loop = asyncio.get_running_loop()
    items: list = []
    token = ""
    for _ in range(MAX_PAGES):
        left = deadline - loop.time()
        if left <= 0:
            raise _Late()
        page, token = await read(token, left)
        items.extend(page)
        if not token:
            return items
    log.warning("a quota listing has more than %d pages; the overview sums the first", MAX_PAGES)
    return items


@dataclass(frozen=True)
class _RegionRead:
    region: str
    available: bool
    packages: tuple[PackageSeen, ...] = ()
    alerts: tuple[AlertSeen, ...] = ()


async def _read_region(ctx: BillingContext, account_id: str, region: str) -> _RegionRead:
    """The account's packages in force and usage alerts in one region, or unavailable."""
    deadline = asyncio.get_running_loop().time() + READ_TIMEOUT
    quota = ctx.quota
    try:
        packages = await _all_pages(
            lambda token, left: quota.list_packages(
                region,
                account_id=account_id,
                states=IN_FORCE_STATES,
                page_size=_PAGE,
                page_token=token,
                within=left,
            ),
            deadline,
        )
        alerts = await _all_pages(
            lambda token, left: quota.list_usage_alerts(region, account_id, token, within=left),
            deadline,
        )
    except (AllotError, _Late) as error:
        log.warning("overview of %s: region %s unavailable (%s)", account_id, region, error)
        return _RegionRead(region, False)
    return _RegionRead(region, True, tuple(packages), tuple(alerts))


async def overview(ctx: BillingContext, account_id: str, regions: Sequence[str]) -> AccountOverview:
    """The account, and every region of ``regions`` (catalog order) read concurrently."""
    now = ctx.now()
    start, end = month_bounds(month_key(now, ctx.tz), ctx.tz)

    async def own(uow):
        return await load_account(uow, account_id), await month_usage(uow, account_id, start, end)

    account, month = await ctx.db.read(own)
    notification = ctx.notification
    reads, audience = await asyncio.gather(
        asyncio.gather(*(_read_region(ctx, account_id, r) for r in regions)),
        notification.usage_alert_audience(account_id) if notification else _unknown(),
    )
    figures = []
    alerts: list[AlertSeen] = []
    for read in reads:
        usage = {api: m for (region, api), m in month.items() if region == read.region}
        figures.append(region_figures(read.region, read.available, read.packages, usage))
        alerts.extend(read.alerts)
    return AccountOverview(
        account=account,
        regions=tuple(figures),
        unheard_alerts=unheard_alerts(alerts, audience),
        notification_available=audience is not None,
    )


async def _unknown() -> None:
    return None


# --- packages across regions -----------------------------------------------------------------


@dataclass(frozen=True)
class PackageQuery:
    account_id: str
    regions: tuple[str, ...]  # the regions listed, in catalog order
    api: str
    states: tuple[int, ...]
    enterprise_project_id: str


@dataclass(frozen=True)
class PackagePage:
    packages: tuple[PackageSeen, ...]
    unavailable_regions: tuple[str, ...]
    # Where the next page starts: (region, quota's page token in that region; "" = its start).
    next_position: tuple[str, str] | None


async def list_packages(
    ctx: BillingContext, query: PackageQuery, after: tuple[str, str] | None, limit: int
) -> PackagePage:
    """One page of the account's packages across regions: region by region in catalog order,
    each region's packages in quota's order, resumed at ``after`` (a region and quota's own
    page token there). A region that does not answer is skipped and named. The filters are
    quota's (a project: the packages designated to it and those for every project, the
    packages that can pay its calls)."""
    await ctx.db.read(lambda uow: load_account(uow, query.account_id))
    first, inner = after if after else (query.regions[0] if query.regions else "", "")
    if after and first not in query.regions:
        raise InvalidArgument("page_token", "page_token belongs to a different query")
    regions = query.regions[query.regions.index(first) :] if query.regions else ()
    found: list[PackageSeen] = []
    unavailable: list[str] = []
    for index, region in enumerate(regions):
        token = inner if index == 0 else ""
        while True:
            if len(found) >= limit:
                return PackagePage(tuple(found), tuple(unavailable), (region, token))
            try:
                page, token = await ctx.quota.list_packages(
                    region,
                    account_id=query.account_id,
                    api=query.api,
                    states=query.states,
                    enterprise_project_id=query.enterprise_project_id,
                    page_size=limit - len(found),
                    page_token=token,
                )
            except AllotError as error:
                log.warning(
                    "packages of %s: region %s unavailable (%s)", query.account_id, region, error
                )
                unavailable.append(region)
                break
            found.extend(page)
            if not token:
                break
    return PackagePage(tuple(found), tuple(unavailable), None)
