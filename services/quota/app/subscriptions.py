"""Use cases of API subscriptions and admission (CheckQuota)."""

from __future__ import annotations

from services.quota.adapters import subscriptions_repository as subscriptions_repo
from services.quota.app import spending_caps
from services.quota.app.admission_reads import AdmissionReads
from services.quota.app.context import QuotaContext
from services.quota.app.rate_limits import RateLimits
from services.quota.domain.admission import Admission, Standing, admit
from shared.db import UnitOfWork
from shared.errors import NotFound
from shared.projects import normalize_project_id
from shared.validation import check_account_id, check_quantity

ACTIVE, CANCELLED = 1, 2  # ApiSubscriptionState


def _check(ctx: QuotaContext, account_id: str, region: str, api: str) -> None:
    check_account_id(account_id)
    ctx.check_region(region)
    ctx.check_api(api)


async def enable_api(ctx: QuotaContext, uow: UnitOfWork, account_id: str, region: str, api: str):
    _check(ctx, account_id, region, api)
    return await subscriptions_repo.put_subscription(
        uow, account_id, region, api, ACTIVE, ctx.now()
    )


async def disable_api(ctx: QuotaContext, uow: UnitOfWork, account_id: str, region: str, api: str):
    _check(ctx, account_id, region, api)
    if await subscriptions_repo.get_subscription(uow, account_id, region, api) is None:
        raise NotFound(
            "API_SUBSCRIPTION_NOT_FOUND",
            f"{account_id!r} never enabled {api!r} in {region!r}",
            account_id=account_id,
            region=region,
            api=api,
        )
    return await subscriptions_repo.put_subscription(
        uow, account_id, region, api, CANCELLED, ctx.now()
    )


async def list_subscriptions(
    ctx: QuotaContext,
    account_id: str,
    region: str,
    visible_regions: tuple[str, ...] | None,
    after: list | None,
    limit: int,
):
    check_account_id(account_id)
    regions = ctx.regions_or_all(region, visible_regions)

    async def work(uow: UnitOfWork):
        return await subscriptions_repo.list_subscriptions(uow, account_id, regions, after, limit)

    return await ctx.db.read(work)


async def check_quota(
    ctx: QuotaContext,
    reads: AdmissionReads,
    account_id: str,
    region: str,
    api: str,
    project: str,
    quantity: int,
    rate_limits: RateLimits | None = None,
) -> Admission:
    _check(ctx, account_id, region, api)
    check_quantity(quantity, "quantity")
    facts = await reads.facts((account_id, region, api, normalize_project_id(project)))
    spent = spending_caps.month_spend(ctx, facts)
    admission = admit(
        subscribed=facts.state == ACTIVE,
        standing=Standing(facts.standing) if facts.standing else Standing.GOOD,
        remaining_quantity=facts.remaining,
        quantity=quantity or 1,
        block_pay_per_use_in_grace=facts.block,
        spending_cap_micros=facts.cap_micros,
        month_spend_micros=max(spent, facts.admitted_micros),
    )
    # Then the spending cap: only a capped pay-per-use call pays a statement
    # (docs/design/spending-cap.md).
    admission = await spending_caps.apply(
        ctx, (account_id, region, api), facts, admission, quantity or 1, spent
    )
    # Last: only a call admitted otherwise takes a token, and only a limited one pays a query.
    if rate_limits is None:
        return admission
    return await rate_limits.apply((account_id, region, api), admission)
