"""The month's pay-per-use and what admission let through under a spending cap (tables
`pay_per_use_months`, `spending_cap_admissions`; docs/design/spending-cap.md).

`admit` is the whole decision of a capped pay-per-use `CheckQuota` in one atomic statement, the
same shape as the rate limit's token (`rate_limits_repository.take_token`): an upsert of the
account's month row that adds the call's price only while what was let through (or counted
as recorded, whichever is more) is below the cap. Concurrent calls of every replica of the
database meet on the row (PostgreSQL: `INSERT … ON CONFLICT DO UPDATE` locks it; SQLite: one
writer at a time), so no two calls take the same room under the cap.
"""

from __future__ import annotations

import functools

from sqlalchemy import BigInteger, bindparam, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from services.quota.adapters import tables as t
from shared.db import UnitOfWork

MonthKey = tuple[str, str, str, str]  # account, month, region, API


async def month_quantity_for_update(uow: UnitOfWork, key: MonthKey) -> int | None:
    """The month's pay-per-use calls of the key, its row locked; None: no row yet."""
    c = t.pay_per_use_months.c
    account_id, month, region, api = key
    query = (
        select(c.quantity)
        .where(c.account_id == account_id, c.month == month, c.region == region, c.api == api)
        .with_for_update()
    )
    row = (await uow.session.execute(query)).first()
    return None if row is None else int(row.quantity)


async def add_month(
    uow: UnitOfWork, key: MonthKey, quantity: int, amount_micros: int, new: bool
) -> None:
    """Add calls and their price to the key's row (a `new` row, or the one it has). Two new
    rows of one key inserted at once: the primary key fails and the transaction is retried."""
    account_id, month, region, api = key
    if new:
        await uow.session.execute(
            insert(t.pay_per_use_months).values(
                account_id=account_id,
                month=month,
                region=region,
                api=api,
                quantity=quantity,
                amount_micros=amount_micros,
            )
        )
        return
    c = t.pay_per_use_months.c
    await uow.session.execute(
        update(t.pay_per_use_months)
        .where(c.account_id == account_id, c.month == month, c.region == region, c.api == api)
        .values(quantity=c.quantity + quantity, amount_micros=c.amount_micros + amount_micros)
    )


async def month_amount(uow: UnitOfWork, account_id: str, month: str) -> int:
    """Micros the account's pay-per-use recorded here in `month` costs, every region and API."""
    c = t.pay_per_use_months.c
    query = select(func.coalesce(func.sum(c.amount_micros), 0)).where(
        c.account_id == account_id, c.month == month
    )
    return int((await uow.session.execute(query)).scalar_one())


@functools.cache
def _admit_statement(dialect: str):
    """INSERT the call's price over the recorded spend, or, on the existing row, add it to the
    larger of the admitted and recorded spend while that is below the cap; RETURNING the
    answer. Every right-hand side reads the row as it was."""
    a = t.spending_cap_admissions.c
    spent, price, cap = (bindparam(n, type_=BigInteger) for n in ("spent", "price", "cap"))
    floor = case((a.admitted_micros > spent, a.admitted_micros), else_=spent)
    admitted = floor < cap
    insert_ = (postgresql if dialect == "postgresql" else sqlite).insert(t.spending_cap_admissions)
    return (
        insert_.values(
            account_id=bindparam("account_id"),
            month=bindparam("month"),
            admitted_micros=spent + price,
            admitted=True,
        )
        .on_conflict_do_update(
            index_elements=[a.account_id, a.month],
            set_={
                "admitted_micros": case((admitted, floor + price), else_=a.admitted_micros),
                "admitted": admitted,
            },
        )
        .returning(a.admitted, a.admitted_micros)
    )


async def admit(
    uow: UnitOfWork,
    account_id: str,
    month: str,
    spent_micros: int,
    price_micros: int,
    cap_micros: int,
) -> tuple[bool, int]:
    """Let one capped pay-per-use call of `price_micros` through if the month's room allows:
    (admitted, micros let through this month after the call). The caller has checked that the
    recorded spend it read is below the cap (so a first row is always an admission)."""
    connection = await uow.connection()
    row = (
        await connection.execute(
            _admit_statement(uow.dialect),
            {
                "account_id": account_id,
                "month": month,
                "spent": spent_micros,
                "price": price_micros,
                "cap": cap_micros,
            },
        )
    ).one()
    return bool(row.admitted), int(row.admitted_micros)
