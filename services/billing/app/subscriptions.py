"""Use cases of API subscriptions: billing checks the account's standing, quota enables the API.

Quota trusts billing (its `internal` caller); billing is where the account and its standing are
checked. Billing keeps its own record of what it asked for, so releasing an account can cancel
its subscriptions.

The request id billing sends to quota (docs/security.md, "Subscriptions without a request_id")
is made per subscription: without a request_id every call is a fresh command (not idempotent,
like any call without one), with one it is derived from the caller's idempotency owner, the
account, region, API and the request_id, so two different subscriptions never share quota's
key. Billing's record is written under the request's own idempotency key (the caller passes
`keep`), so a replayed request changes neither quota nor billing's record and the two agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.billing.adapters import subscriptions_repository
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.domain.arrears import Standing, may_purchase
from services.billing.domain.subscriptions import Subscription, SubscriptionState
from shared.auth import current_principal
from shared.db import UnitOfWork
from shared.errors import FailedPrecondition
from shared.ids import new_id

ACTIVE, CANCELLED = SubscriptionState.ACTIVE, SubscriptionState.CANCELLED

T = TypeVar("T")
# Runs billing's record in a transaction (with the request's idempotency key, when it has one).
Keep = Callable[[Callable[[UnitOfWork], Awaitable["Subscription"]]], Awaitable[T]]


def _check(ctx: BillingContext, region: str, api: str) -> None:
    ctx.check_region(region)
    ctx.check_api(api)


def quota_request_id(verb: str, request_id: str, account_id: str, region: str, api: str) -> str:
    """The request id of the EnableApi/DisableApi billing sends for one (un)subscribe call."""
    if not request_id:
        return new_id(verb)
    owner = current_principal().idempotency_owner
    key = "\n".join((verb, owner, account_id, region, api, request_id))
    return f"{verb}-{hashlib.sha256(key.encode()).hexdigest()}"


async def subscribe(
    ctx: BillingContext,
    request_id: str,
    account_id: str,
    region: str,
    api: str,
    keep: Keep[T],
) -> T:
    """Enable an API for an account in good standing (quota first, then billing's record)."""
    _check(ctx, region, api)
    account = await ctx.db.read(lambda uow: accounts.load_account(uow, account_id))
    if not may_purchase(Standing(account.standing)):
        raise FailedPrecondition(
            "ACCOUNT_IN_ARREARS",
            f"account {account_id!r} is in arrears ({account.standing.name})",
            account_id=account_id,
            standing=account.standing.name,
        )
    await ctx.quota.enable_api(
        quota_request_id("subscribe", request_id, account_id, region, api),
        account_id,
        region,
        api,
    )
    return await keep(lambda uow: record(ctx, uow, account_id, region, api, ACTIVE))


async def unsubscribe(
    ctx: BillingContext,
    request_id: str,
    account_id: str,
    region: str,
    api: str,
    keep: Keep[T],
) -> T:
    _check(ctx, region, api)
    await ctx.db.read(lambda uow: accounts.load_account(uow, account_id))
    await ctx.quota.disable_api(
        quota_request_id("unsubscribe", request_id, account_id, region, api),
        account_id,
        region,
        api,
    )
    return await keep(lambda uow: record(ctx, uow, account_id, region, api, CANCELLED))


async def record(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, region: str, api: str, state: int
) -> Subscription:
    return await subscriptions_repository.put_subscription(
        uow, account_id, region, api, state, ctx.now()
    )
