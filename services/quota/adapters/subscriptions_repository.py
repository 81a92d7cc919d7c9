"""Quota's API subscriptions (which APIs an account may call where) and the account standings
billing announced: the rows admission reads."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import and_, or_, select

from services.quota.adapters import tables as t
from shared.api_subscriptions import get_api_subscription, put_api_subscription
from shared.db import UnitOfWork


async def get_subscription(uow: UnitOfWork, account_id: str, region: str, api: str):
    return await get_api_subscription(uow, t.api_subscriptions, account_id, region, api)


async def put_subscription(
    uow: UnitOfWork, account_id: str, region: str, api: str, state: int, now: datetime
):
    return await put_api_subscription(uow, t.api_subscriptions, account_id, region, api, state, now)


async def list_subscriptions(
    uow: UnitOfWork, account_id: str, regions: Iterable[str], after: list | None, limit: int
):
    s = t.api_subscriptions.c
    query = (
        select(t.api_subscriptions)
        .where(s.account_id == account_id, s.region.in_(sorted(set(regions))))
        .order_by(s.region, s.api)
        .limit(limit)
    )
    if after:
        region, api = after
        query = query.where(or_(s.region > region, and_(s.region == region, s.api > api)))
    return (await uow.session.execute(query)).all()


async def get_standing(uow: UnitOfWork, account_id: str) -> int | None:
    return (
        await uow.session.execute(
            select(t.account_standings.c.standing).where(
                t.account_standings.c.account_id == account_id
            )
        )
    ).scalar()
