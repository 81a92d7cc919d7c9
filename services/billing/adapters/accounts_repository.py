"""Accounts: rows <-> ``domain.accounts.Account``, balances, standings and balance alerts.

Every function works in the caller's unit of work; ``for_update`` locks the account's row
(``FOR UPDATE`` on PostgreSQL; SQLite writers hold the database lock already).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, update

from services.billing.adapters import tables as t
from services.billing.domain.accounts import Account, AccountKind
from services.billing.domain.arrears import ArrearsState, Standing
from shared.db import UnitOfWork
from shared.timeutil import from_epoch_us, to_epoch_us

_a = t.accounts.c


def _optional_time(value: int | None) -> datetime | None:
    return from_epoch_us(value) if value is not None else None


def _us(value: datetime | None) -> int | None:
    return to_epoch_us(value) if value is not None else None


def _to_account(row, paying_row=None) -> Account:
    payer = paying_row if paying_row is not None else row
    return Account(
        account_id=row.account_id,
        display_name=row.display_name,
        kind=AccountKind(row.kind),
        master_account_id=row.master_account_id,
        currency_code=row.currency_code,
        balance_micros=payer.balance_micros,
        standing=Standing(payer.standing),
        standing_change_time=_optional_time(payer.standing_change_time_us),
        grace_end_time=_optional_time(payer.grace_end_time_us),
        retention_end_time=_optional_time(payer.retention_end_time_us),
        grace_period=timedelta(seconds=row.grace_period_s),
        retention_period=timedelta(seconds=row.retention_period_s),
        balance_alert_micros=row.balance_alert_micros,
        create_time=from_epoch_us(row.create_time_us),
        update_time=from_epoch_us(row.update_time_us),
        block_pay_per_use_in_grace=bool(row.block_pay_per_use_in_grace),
        monthly_spending_cap_micros=int(row.monthly_spending_cap_micros),
    )


async def _row(uow: UnitOfWork, account_id: str, for_update: bool = False):
    query = select(t.accounts).where(_a.account_id == account_id)
    if for_update:
        query = query.with_for_update()
    return (await uow.session.execute(query)).first()


async def get(uow: UnitOfWork, account_id: str, for_update: bool = False) -> Account | None:
    """The account as callers see it (a member shows its master's balance and standing), or
    None. ``for_update`` locks the account's own row."""
    row = await _row(uow, account_id, for_update)
    if row is None:
        return None
    payer = await _row(uow, row.master_account_id) if row.master_account_id else None
    return _to_account(row, payer)


async def exists(uow: UnitOfWork, account_id: str) -> bool:
    found = await uow.session.execute(select(_a.account_id).where(_a.account_id == account_id))
    return found.first() is not None


async def insert_account(uow: UnitOfWork, account: Account) -> None:
    await uow.session.execute(
        insert(t.accounts).values(
            account_id=account.account_id,
            display_name=account.display_name,
            kind=int(account.kind),
            master_account_id=account.master_account_id,
            currency_code=account.currency_code,
            balance_micros=account.balance_micros,
            standing=int(account.standing),
            grace_period_s=int(account.grace_period.total_seconds()),
            retention_period_s=int(account.retention_period.total_seconds()),
            create_time_us=to_epoch_us(account.create_time),
            update_time_us=to_epoch_us(account.update_time),
            block_pay_per_use_in_grace=account.block_pay_per_use_in_grace,
        )
    )


async def update_settings(uow: UnitOfWork, account_id: str, values: dict, now: datetime) -> None:
    """Write settings of the account (``display_name``, ``block_pay_per_use_in_grace``)."""
    await uow.session.execute(
        update(t.accounts)
        .where(_a.account_id == account_id)
        .values(update_time_us=to_epoch_us(now), **values)
    )


async def list_ids(
    uow: UnitOfWork, only: str | None, master_account_id: str, after_id: str | None, limit: int
) -> list[str]:
    """Account ids in order; ``only`` one account, ``master_account_id`` an enterprise's
    members."""
    query = select(_a.account_id).order_by(_a.account_id).limit(limit)
    if only is not None:
        query = query.where(_a.account_id == only)
    if master_account_id:
        query = query.where(_a.master_account_id == master_account_id)
    if after_id:
        query = query.where(_a.account_id > after_id)
    return [r.account_id for r in (await uow.session.execute(query)).all()]


async def member_ids(uow: UnitOfWork, payer_id: str) -> list[str]:
    query = select(_a.account_id).where(_a.master_account_id == payer_id)
    return [r.account_id for r in (await uow.session.execute(query)).all()]


async def member_settings(uow: UnitOfWork, payer_id: str) -> list[tuple[str, bool, int]]:
    """(account id, own block_pay_per_use_in_grace, own monthly spending cap in micros) of
    each member of ``payer_id``."""
    query = (
        select(_a.account_id, _a.block_pay_per_use_in_grace, _a.monthly_spending_cap_micros)
        .where(_a.master_account_id == payer_id)
        .order_by(_a.account_id)
    )
    rows = (await uow.session.execute(query)).all()
    return [
        (r.account_id, bool(r.block_pay_per_use_in_grace), int(r.monthly_spending_cap_micros))
        for r in rows
    ]


async def locked_balance(uow: UnitOfWork, account_id: str) -> int:
    """The account's own balance, its row locked."""
    query = select(_a.balance_micros).where(_a.account_id == account_id).with_for_update()
    return (await uow.session.execute(query)).scalar_one()


async def set_balance(
    uow: UnitOfWork,
    account_id: str,
    balance_micros: int,
    now: datetime,
    standing: ArrearsState | None = None,
) -> None:
    """Write the balance (and, when given, the standing) of a paying account."""
    values = {"balance_micros": balance_micros, "update_time_us": to_epoch_us(now)}
    if standing is not None:
        values.update(_standing_values(standing))
    await uow.session.execute(
        update(t.accounts).where(_a.account_id == account_id).values(**values)
    )


async def add_to_balance(uow: UnitOfWork, account_id: str, amount_micros: int, now: datetime):
    """Move the balance by the signed ``amount_micros`` (in the statement itself)."""
    await uow.session.execute(
        update(t.accounts)
        .where(_a.account_id == account_id)
        .values(balance_micros=_a.balance_micros + amount_micros, update_time_us=to_epoch_us(now))
    )


def _standing_values(state: ArrearsState) -> dict:
    return {
        "standing": int(state.standing),
        "standing_change_time_us": _us(state.since),
        "grace_end_time_us": _us(state.grace_end),
        "retention_end_time_us": _us(state.retention_end),
    }


async def save_standing(
    uow: UnitOfWork, account_id: str, state: ArrearsState, now: datetime
) -> None:
    """Write ``state`` into the account's standing columns."""
    await uow.session.execute(
        update(t.accounts)
        .where(_a.account_id == account_id)
        .values(update_time_us=to_epoch_us(now), **_standing_values(state))
    )


async def balance_alert(uow: UnitOfWork, account_id: str) -> tuple[int | None, bool, str]:
    """The balance alert's threshold (None: none set), whether it fired, and the currency."""
    query = select(_a.balance_alert_micros, _a.balance_alert_fired, _a.currency_code).where(
        _a.account_id == account_id
    )
    row = (await uow.session.execute(query)).one()
    return row.balance_alert_micros, row.balance_alert_fired, row.currency_code


async def set_alert_fired(uow: UnitOfWork, account_id: str, fired: bool) -> None:
    await uow.session.execute(
        update(t.accounts).where(_a.account_id == account_id).values(balance_alert_fired=fired)
    )


async def set_balance_alert(
    uow: UnitOfWork, account_id: str, threshold_micros: int | None, now: datetime
) -> None:
    """Set (or clear, with None) the threshold; the alert is armed again."""
    await uow.session.execute(
        update(t.accounts)
        .where(_a.account_id == account_id)
        .values(
            balance_alert_micros=threshold_micros,
            balance_alert_fired=False,
            update_time_us=to_epoch_us(now),
        )
    )


async def due_standings(uow: UnitOfWork, now: datetime, after: str, limit: int) -> list[str]:
    """Paying accounts whose grace or retention has ended by ``now``, by id after ``after``."""
    now_us = to_epoch_us(now)
    query = (
        select(_a.account_id)
        .where(
            _a.kind != int(AccountKind.ENTERPRISE_MEMBER),
            or_(
                and_(_a.standing == int(Standing.GRACE), _a.grace_end_time_us <= now_us),
                and_(_a.standing == int(Standing.FROZEN), _a.retention_end_time_us <= now_us),
            ),
            _a.account_id > after,
        )
        .order_by(_a.account_id)
        .limit(limit)
    )
    return list((await uow.session.execute(query)).scalars().all())
