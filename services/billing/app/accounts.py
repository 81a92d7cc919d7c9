"""Use cases of accounts: create, read, top up, balance alerts.

A standalone account and an enterprise master pay from their own balance; an enterprise member
has none of its own (its balance stays 0): its charges are taken from its master's balance,
and it is in arrears when its master is. Every change of a balance is a ledger line, so a
month's bill is exactly the change of the balance over that month.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update

from services.billing.adapters import tables as t
from services.billing.app.context import BillingContext
from services.billing.domain.arrears import Standing
from services.billing.domain.bills import BillLineKind
from shared.db import UnitOfWork
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id
from shared.money import MAX_AMOUNT_MICROS, MICROS_PER_UNIT
from shared.timeutil import from_epoch_us, to_epoch_us
from shared.validation import check_account_id

DEFAULT_PERIOD = timedelta(days=15)
MAX_PERIOD = timedelta(days=366)


class AccountKind(enum.IntEnum):
    STANDALONE = 1
    ENTERPRISE_MASTER = 2
    ENTERPRISE_MEMBER = 3


@dataclass(frozen=True)
class Account:
    account_id: str
    display_name: str
    kind: AccountKind
    master_account_id: str
    currency_code: str
    balance_micros: int  # the balance that pays: the master's for a member
    standing: Standing
    standing_change_time: datetime | None
    grace_end_time: datetime | None
    retention_end_time: datetime | None
    grace_period: timedelta
    retention_period: timedelta
    balance_alert_micros: int | None
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class AccountInput:
    account_id: str
    display_name: str
    kind: int
    master_account_id: str
    currency_code: str
    grace_period: timedelta | None
    retention_period: timedelta | None


def account_not_found(account_id: str) -> NotFound:
    return NotFound("ACCOUNT_NOT_FOUND", f"no account {account_id!r}", account_id=account_id)


def _optional_time(value: int | None) -> datetime | None:
    return from_epoch_us(value) if value is not None else None


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
    )


async def _row(uow: UnitOfWork, account_id: str, for_update: bool = False):
    query = select(t.accounts).where(t.accounts.c.account_id == account_id)
    if for_update:
        query = query.with_for_update()
    return (await uow.session.execute(query)).first()


async def load_account(uow: UnitOfWork, account_id: str, for_update: bool = False) -> Account:
    """The account as callers see it: a member shows its master's balance and standing."""
    check_account_id(account_id)
    row = await _row(uow, account_id, for_update)
    if row is None:
        raise account_not_found(account_id)
    payer = await _row(uow, row.master_account_id) if row.master_account_id else None
    return _to_account(row, payer)


def _period(value: timedelta | None, field: str) -> timedelta:
    if value is None:
        return DEFAULT_PERIOD
    if not timedelta(0) <= value <= MAX_PERIOD:
        raise InvalidArgument(field, f"{field} must be between 0 and 366 days")
    return value


async def create_account(ctx: BillingContext, uow: UnitOfWork, spec: AccountInput) -> Account:
    check_account_id(spec.account_id, "account.account_id")
    if len(spec.display_name) > 200:
        raise InvalidArgument("account.display_name", "display_name is longer than 200 characters")
    try:
        kind = AccountKind(spec.kind or AccountKind.STANDALONE)
    except ValueError:
        raise InvalidArgument("account.kind", "unknown account kind") from None
    currency = spec.currency_code or ctx.catalog.currency
    if currency != ctx.catalog.currency:
        raise InvalidArgument(
            "account.currency_code",
            f"accounts are kept in the catalog's currency {ctx.catalog.currency}",
            reason="CURRENCY_NOT_SUPPORTED",
            currency_code=currency,
        )
    master = spec.master_account_id
    if kind == AccountKind.ENTERPRISE_MEMBER:
        if not master:
            raise InvalidArgument(
                "account.master_account_id", "an enterprise member names its master"
            )
        master_row = await _row(uow, master)
        if master_row is None or master_row.kind != AccountKind.ENTERPRISE_MASTER:
            # The request is well formed; the master it names is not there (or is no master):
            # FAILED_PRECONDITION, as the contract says.
            raise FailedPrecondition(
                "INVALID_MASTER_ACCOUNT",
                f"{master!r} is not an enterprise master account",
                master_account_id=master,
            )
    elif master:
        raise InvalidArgument(
            "account.master_account_id", "only enterprise members have a master account"
        )
    if await _row(uow, spec.account_id) is not None:
        raise AlreadyExists(
            "ACCOUNT_ALREADY_EXISTS",
            f"account {spec.account_id!r} exists",
            account_id=spec.account_id,
        )
    now_us = to_epoch_us(ctx.now())
    await uow.session.execute(
        insert(t.accounts).values(
            account_id=spec.account_id,
            display_name=spec.display_name,
            kind=int(kind),
            master_account_id=master,
            currency_code=currency,
            balance_micros=0,
            standing=int(Standing.GOOD),
            grace_period_s=int(_period(spec.grace_period, "account.grace_period").total_seconds()),
            retention_period_s=int(
                _period(spec.retention_period, "account.retention_period").total_seconds()
            ),
            create_time_us=now_us,
            update_time_us=now_us,
        )
    )
    return await load_account(uow, spec.account_id)


async def get_account(ctx: BillingContext, account_id: str) -> Account:
    return await ctx.db.read(lambda uow: load_account(uow, account_id))


async def list_accounts(
    ctx: BillingContext,
    only: str | None,
    master_account_id: str,
    after_id: str | None,
    limit: int,
) -> list[Account]:
    """Accounts by id; `only` restricts the listing to one account (account principals),
    `master_account_id` to an enterprise's members."""
    a = t.accounts.c
    query = select(a.account_id).order_by(a.account_id).limit(limit)
    if only is not None:
        query = query.where(a.account_id == only)
    if master_account_id:
        query = query.where(a.master_account_id == master_account_id)
    if after_id:
        query = query.where(a.account_id > after_id)

    async def work(uow: UnitOfWork) -> list[Account]:
        ids = [r.account_id for r in (await uow.session.execute(query)).all()]
        return [await load_account(uow, i) for i in ids]

    return await ctx.db.read(work)


def _check_amount(amount_micros: int, currency: str, expected: str, field: str) -> None:
    if currency and currency != expected:
        raise InvalidArgument(
            field,
            f"{field} must be in the account's currency {expected}",
            reason="CURRENCY_MISMATCH",
            currency_code=currency,
        )


async def top_up(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, amount_micros: int, currency: str
) -> Account:
    """Add to the balance; a top-up that clears the debt ends arrears at once."""
    row = await _row(uow, check_account_id(account_id), for_update=True)
    if row is None:
        raise account_not_found(account_id)
    if row.kind == AccountKind.ENTERPRISE_MEMBER:
        raise FailedPrecondition(
            "ACCOUNT_PAID_BY_MASTER",
            f"{account_id!r} is paid for by {row.master_account_id!r}: top up the master",
            master_account_id=row.master_account_id,
        )
    _check_amount(amount_micros, currency, row.currency_code, "amount")
    if amount_micros <= 0:
        raise InvalidArgument("amount", "a top-up must be positive")
    now = ctx.now()
    balance = row.balance_micros + amount_micros
    if balance > MAX_AMOUNT_MICROS:
        raise FailedPrecondition(
            "BALANCE_LIMIT",
            f"the balance may hold at most {MAX_AMOUNT_MICROS // MICROS_PER_UNIT} units",
            account_id=account_id,
        )
    values = {"balance_micros": balance, "update_time_us": to_epoch_us(now)}
    if balance >= 0 and row.standing != Standing.GOOD:
        values.update(
            standing=int(Standing.GOOD),
            standing_change_time_us=to_epoch_us(now),
            grace_end_time_us=None,
            retention_end_time_us=None,
        )
    await uow.session.execute(
        update(t.accounts).where(t.accounts.c.account_id == account_id).values(**values)
    )
    await uow.session.execute(
        insert(t.ledger).values(
            entry_id=new_id("led"),
            account_id=account_id,
            paying_account_id=account_id,
            kind=int(BillLineKind.TOP_UP),
            amount_micros=amount_micros,
            description="top-up",
            occur_time_us=to_epoch_us(now),
        )
    )
    await balance_moved(ctx, uow, account_id, row.balance_micros, balance, now)
    account = await load_account(uow, account_id)
    if "standing" in values:
        await announce_standing(ctx, uow, account, Standing(row.standing))
    return account


async def balance_moved(
    ctx: BillingContext, uow: UnitOfWork, payer_id: str, before: int, after: int, now: datetime
) -> None:
    """The balance alert after the paying balance moved from ``before`` to ``after`` (the
    account locked): any charge (pay-per-use, purchase, renewal) that takes it below the
    threshold emits ``balance_below_threshold`` once; the alert re-arms when the balance is at
    or above the threshold again (a top-up, a refund)."""
    a = t.accounts.c
    row = (
        await uow.session.execute(
            select(a.balance_alert_micros, a.balance_alert_fired, a.currency_code).where(
                a.account_id == payer_id
            )
        )
    ).one()
    threshold = row.balance_alert_micros
    if threshold is None:
        return
    if after < threshold and after < before and not row.balance_alert_fired:
        ctx.events.balance_below_threshold(uow, payer_id, after, threshold, row.currency_code, now)
        fired = True
    elif after >= threshold and row.balance_alert_fired:
        fired = False
    else:
        return
    await uow.session.execute(
        update(t.accounts).where(a.account_id == payer_id).values(balance_alert_fired=fired)
    )


async def announce_standing(
    ctx: BillingContext, uow: UnitOfWork, payer: Account, previous: Standing
) -> None:
    """account_standing_changed for the paying account and each of its members."""
    members = (
        await uow.session.execute(
            select(t.accounts.c.account_id).where(
                t.accounts.c.master_account_id == payer.account_id
            )
        )
    ).all()
    for account_id in [payer.account_id, *(m.account_id for m in members)]:
        ctx.events.standing_changed(uow, account_id, payer, previous, ctx.now())


async def set_balance_alert(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    threshold_micros: int | None,
    currency: str,
) -> Account:
    """Set (or clear, with None) the balance alert; it fires when the balance drops below."""
    row = await _row(uow, check_account_id(account_id), for_update=True)
    if row is None:
        raise account_not_found(account_id)
    if threshold_micros is not None:
        _check_amount(threshold_micros, currency, row.currency_code, "threshold")
    await uow.session.execute(
        update(t.accounts)
        .where(t.accounts.c.account_id == account_id)
        .values(
            balance_alert_micros=threshold_micros,
            balance_alert_fired=False,
            update_time_us=to_epoch_us(ctx.now()),
        )
    )
    return await load_account(uow, account_id)
