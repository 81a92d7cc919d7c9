"""Billing's record of API subscriptions (table ``api_subscriptions``): the release of an
account's subscriptions, marked in the transaction of the change of standing and confirmed
once quota has disabled them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select, update

from services.billing.adapters import tables as t
from services.billing.domain.subscriptions import PendingRelease, Subscription, SubscriptionState
from shared.api_subscriptions import put_api_subscription
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_s = t.api_subscriptions.c


async def put_subscription(
    uow: UnitOfWork, account_id: str, region: str, api: str, state: int, now: datetime
) -> Subscription:
    """Record that billing asked quota for (account, region, api) in `state`."""
    row = await put_api_subscription(
        uow, t.api_subscriptions, account_id, region, api, int(state), now
    )
    return Subscription(
        account_id=row.account_id,
        region=row.region,
        api=row.api,
        state=row.state,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
    )


async def mark_releasing(uow: UnitOfWork, payer_id: str, released: datetime) -> int:
    """Mark the ACTIVE subscriptions of the account and its members as RELEASING."""
    members = select(t.accounts.c.account_id).where(t.accounts.c.master_account_id == payer_id)
    result = await uow.session.execute(
        update(t.api_subscriptions)
        .where(
            or_(_s.account_id == payer_id, _s.account_id.in_(members)),
            _s.state == int(SubscriptionState.ACTIVE),
        )
        .values(state=int(SubscriptionState.RELEASING), update_time_us=to_epoch_us(released))
    )
    return result.rowcount or 0


async def pending_releases(uow: UnitOfWork, limit: int) -> list[PendingRelease]:
    """Subscriptions marked RELEASING, earliest mark first."""
    query = (
        select(_s.account_id, _s.region, _s.api, _s.update_time_us)
        .where(_s.state == int(SubscriptionState.RELEASING))
        .order_by(_s.update_time_us, _s.account_id, _s.region, _s.api)
        .limit(limit)
    )
    return [
        PendingRelease(r.account_id, r.region, r.api, r.update_time_us)
        for r in await uow.rows(query)
    ]


async def confirm_release(uow: UnitOfWork, release: PendingRelease, now: datetime) -> int:
    """RELEASING -> CANCELLED, unless the row changed meanwhile (subscribed again)."""
    result = await uow.session.execute(
        update(t.api_subscriptions)
        .where(
            _s.account_id == release.account_id,
            _s.region == release.region,
            _s.api == release.api,
            _s.state == int(SubscriptionState.RELEASING),
            _s.update_time_us == release.marked_us,
        )
        .values(state=int(SubscriptionState.CANCELLED), update_time_us=to_epoch_us(now))
    )
    return result.rowcount or 0
