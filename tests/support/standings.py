"""Billing's account standings written from outside billing, the way its arrears work writes
them: a transaction on billing's database that calls billing's own `change_standing`, which
saves the standing and writes the `account_standing_changed` events into billing's outbox. A
test chooses exactly when a change happens (while quota, billing or the network between them
is down) without walking settlement and the clock. The billing process sees these commits
through its outbox's poll, as it sees another replica's.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from allot.billing.v1 import billing_pb2
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import create_async_engine

from services.billing.adapters import tables as billing_tables
from services.billing.adapters.events import BillingEvents
from services.billing.app import accounts as billing_accounts
from services.billing.app import standing as billing_standing
from services.billing.domain.arrears import ArrearsState
from services.billing.domain.arrears import Standing as BillingStanding
from shared.db import Database
from shared.outbox import Outbox

GOOD = billing_pb2.ACCOUNT_STANDING_GOOD
GRACE = billing_pb2.ACCOUNT_STANDING_GRACE
FROZEN = billing_pb2.ACCOUNT_STANDING_FROZEN
RELEASED = billing_pb2.ACCOUNT_STANDING_RELEASED

GRACE_START = datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
FROZEN_AT = GRACE_START + timedelta(days=15)
RELEASED_AT = FROZEN_AT + timedelta(days=15)
DEBT_MICROS = -2_500_000  # USD -2.50


async def publish_standing(
    ctx, account_id: str, standing: int, balance_micros: int, when: datetime
) -> None:
    """Move a billing account into `standing` at `when` with billing's own `change_standing`
    (what its arrears work calls), in one transaction on billing's database, the balance set to
    `balance_micros`. `ctx` needs billing's `db` and `outbox`; its clock reads `when`."""
    stand_in = SimpleNamespace(
        db=ctx.db, outbox=ctx.outbox, events=BillingEvents(ctx.outbox), now=lambda: when
    )
    arrears = ArrearsState(BillingStanding(standing), when, FROZEN_AT, RELEASED_AT)

    async def work(uow) -> None:
        before = await billing_accounts.load_account(uow, account_id, for_update=True)
        await uow.session.execute(
            update(billing_tables.accounts)
            .where(billing_tables.accounts.c.account_id == account_id)
            .values(balance_micros=balance_micros)
        )
        await billing_standing.change_standing(stand_in, uow, account_id, before.standing, arrears)

    await ctx.db.transaction(work)


@contextlib.asynccontextmanager
async def billing_database(database_url: str):
    """Billing's database and outbox, from outside the billing process (the stand-in writer);
    the billing process sees its commits through the outbox's poll."""
    db = Database(database_url)
    try:
        yield SimpleNamespace(
            db=db,
            outbox=Outbox(
                db,
                billing_tables.outbox_events,
                billing_tables.outbox_counter,
                billing_pb2.BillingEvent,
            ),
        )
    finally:
        await db.dispose()


async def read_db(database_url: str, sql: str) -> list:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return list((await connection.execute(text(sql))).all())
    finally:
        await engine.dispose()
