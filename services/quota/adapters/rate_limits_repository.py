"""Rate limit overrides and token buckets (tables `rate_limit_overrides`, `rate_limit_buckets`).

`take_token` is the whole decision of a limited `CheckQuota` in one atomic statement: an
upsert of the bucket row that refills it from the time elapsed, takes one call's token if there
is one and returns the result. Concurrent calls of every replica of the region meet on the
row (PostgreSQL: `INSERT … ON CONFLICT DO UPDATE` locks it; SQLite: one writer at a time), so
no two calls take the same token. The arithmetic is `domain/rate_limits.take`'s.
"""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import BigInteger, bindparam, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from services.quota.adapters import tables as t
from services.quota.domain.rate_limits import TOKEN, Limit, Override
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

Key = tuple[str, str, str]  # account, region, API


def _override(row) -> Override:
    return Override(
        row.account_id,
        row.region,
        row.api,
        Limit(row.per_second, row.burst),
        from_epoch_us(row.update_time_us),
    )


async def all_overrides(uow: UnitOfWork) -> list[Override]:
    return [_override(row) for row in await uow.rows(select(t.rate_limit_overrides))]


async def get_override(uow: UnitOfWork, key: Key) -> Override | None:
    c = t.rate_limit_overrides.c
    account_id, region, api = key
    rows = await uow.rows(
        select(t.rate_limit_overrides).where(
            c.account_id == account_id, c.region == region, c.api == api
        )
    )
    return _override(rows[0]) if rows else None


async def put_override(uow: UnitOfWork, key: Key, limit: Limit | None, now: datetime) -> None:
    """Set the override of `key` (None: remove it)."""
    c = t.rate_limit_overrides.c
    account_id, region, api = key
    connection = await uow.connection()
    await connection.execute(
        delete(t.rate_limit_overrides).where(
            c.account_id == account_id, c.region == region, c.api == api
        )
    )
    if limit is not None:
        await connection.execute(
            t.rate_limit_overrides.insert().values(
                account_id=account_id,
                region=region,
                api=api,
                per_second=limit.per_second,
                burst=limit.burst,
                update_time_us=to_epoch_us(now),
            )
        )


@functools.cache
def _take_statement(dialect: str):
    """INSERT a full bucket less one token, or refill the existing row and take a token if it
    has one; RETURNING what the call got. Every right-hand side reads the row as it was."""
    b = t.rate_limit_buckets.c
    now, rate, capacity, fill_us = (
        bindparam(name, type_=BigInteger)
        for name in ("now_us", "per_second", "capacity", "fill_us")
    )
    elapsed = case((now - b.refill_time_us > fill_us, fill_us), else_=now - b.refill_time_us)
    elapsed = case((elapsed < 0, 0), else_=elapsed)
    refill = b.tokens + elapsed * rate
    refilled = case((refill > capacity, capacity), else_=refill)
    admitted = refilled >= TOKEN
    insert = (postgresql if dialect == "postgresql" else sqlite).insert(t.rate_limit_buckets)
    return (
        insert.values(
            account_id=bindparam("account_id"),
            region=bindparam("region"),
            api=bindparam("api"),
            tokens=capacity - TOKEN,
            refill_time_us=now,
            admitted=True,
        )
        .on_conflict_do_update(
            index_elements=[b.account_id, b.region, b.api],
            set_={
                "tokens": case((admitted, refilled - TOKEN), else_=refilled),
                "refill_time_us": case((now > b.refill_time_us, now), else_=b.refill_time_us),
                "admitted": admitted,
            },
        )
        .returning(t.rate_limit_buckets.c.admitted, t.rate_limit_buckets.c.tokens)
    )


async def take_token(uow: UnitOfWork, key: Key, limit: Limit, now: datetime) -> tuple[bool, int]:
    """Take one call's token from `key`'s bucket now: (admitted, micro-tokens left)."""
    account_id, region, api = key
    connection = await uow.connection()
    row = (
        await connection.execute(
            _take_statement(uow.dialect),
            {
                "account_id": account_id,
                "region": region,
                "api": api,
                "now_us": to_epoch_us(now),
                "per_second": limit.per_second,
                "capacity": limit.capacity,
                "fill_us": limit.fill_us,
            },
        )
    ).one()
    return bool(row.admitted), int(row.tokens)
