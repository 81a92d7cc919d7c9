"""The `api_subscriptions` table that quota and billing each keep, and its one upsert.

Quota's rows say which APIs an account may call in a region (admission reads them); billing's
say which subscriptions billing asked quota for, so releasing an account can cancel them. Both
have the same shape: one row per (account, region, API) with its `ApiSubscriptionState` number
and integer-microsecond times (docs/design/ownership-and-regions.md).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    SmallInteger,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row

from shared.db import UnitOfWork
from shared.timeutil import to_epoch_us


def api_subscriptions_table(metadata: MetaData) -> Table:
    return Table(
        "api_subscriptions",
        metadata,
        Column("account_id", String(64), primary_key=True),
        Column("region", String(64), primary_key=True),
        Column("api", String(64), primary_key=True),
        Column("state", SmallInteger, nullable=False),
        Column("create_time_us", BigInteger, nullable=False),
        Column("update_time_us", BigInteger, nullable=False),
    )


def _key(table: Table, account_id: str, region: str, api: str) -> tuple:
    s = table.c
    return (s.account_id == account_id, s.region == region, s.api == api)


async def get_api_subscription(
    uow: UnitOfWork, table: Table, account_id: str, region: str, api: str
) -> Row | None:
    """The row of (account, region, API) in `table`, or None if there is none."""
    query = select(table).where(*_key(table, account_id, region, api))
    return (await uow.session.execute(query)).first()


async def put_api_subscription(
    uow: UnitOfWork,
    table: Table,
    account_id: str,
    region: str,
    api: str,
    state: int,
    now: datetime,
) -> Row:
    """Set the state of (account, region, API) in `table` and return its row.

    A new row is created at `now`; an existing one in another state is updated at `now`; one
    already in `state` is left as it is (its update time too), so repeating a change is a no-op.
    """
    key = _key(table, account_id, region, api)
    existing = await get_api_subscription(uow, table, account_id, region, api)
    now_us = to_epoch_us(now)
    if existing is None:
        await uow.session.execute(
            insert(table).values(
                account_id=account_id,
                region=region,
                api=api,
                state=state,
                create_time_us=now_us,
                update_time_us=now_us,
            )
        )
    elif existing.state != state:
        await uow.session.execute(
            update(table).where(*key).values(state=state, update_time_us=now_us)
        )
    return (await uow.session.execute(select(table).where(*key))).one()
