"""Use cases of accounts: create, read, update settings, top up, balance alerts.

A standalone account and an enterprise master pay from their own balance; an enterprise member
has none of its own (its balance stays 0): its charges are taken from its master's balance,
and it is in arrears when its master is. Every change of a balance is a ledger line, so a
month's bill is exactly the change of the balance over that month.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.billing.adapters import accounts_repository as repo
from services.billing.adapters import ledger_repository as ledger
from services.billing.adapters import month_usage
from services.billing.app.context import BillingContext
from services.billing.domain.accounts import (
    DEFAULT_PERIOD,
    MAX_PERIOD,
    Account,
    AccountKind,
    account_not_found,
    blocks_pay_per_use_in_grace,
)
from services.billing.domain.arrears import ArrearsState, Standing
from services.billing.domain.bills import BillLine, BillLineKind
from services.billing.domain.cycles import month_bounds, month_key
from shared.db import UnitOfWork
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from shared.money import MAX_AMOUNT_MICROS, MICROS_PER_UNIT
from shared.validation import check_account_id

__all__ = ["Account", "AccountInput", "AccountKind", "account_not_found"]


@dataclass(frozen=True)
class AccountInput:
    account_id: str
    display_name: str
    kind: int
    master_account_id: str
    currency_code: str
    grace_period: timedelta | None
    retention_period: timedelta | None


async def load_account(uow: UnitOfWork, account_id: str, for_update: bool = False) -> Account:
    """The account as callers see it: a member shows its master's balance and standing."""
    check_account_id(account_id)
    account = await repo.get(uow, account_id, for_update)
    if account is None:
        raise account_not_found(account_id)
    return account


def _check_display_name(name: str) -> None:
    if len(name) > 200:
        raise InvalidArgument("account.display_name", "display_name is longer than 200 characters")


def _period(value: timedelta | None, field: str) -> timedelta:
    if value is None:
        return DEFAULT_PERIOD
    if not timedelta(0) <= value <= MAX_PERIOD:
        raise InvalidArgument(field, f"{field} must be between 0 and 366 days")
    return value


async def create_account(ctx: BillingContext, uow: UnitOfWork, spec: AccountInput) -> Account:
    check_account_id(spec.account_id, "account.account_id")
    _check_display_name(spec.display_name)
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
        master_account = await repo.get(uow, master)
        if master_account is None or master_account.kind != AccountKind.ENTERPRISE_MASTER:
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
    if await repo.exists(uow, spec.account_id):
        raise AlreadyExists(
            "ACCOUNT_ALREADY_EXISTS",
            f"account {spec.account_id!r} exists",
            account_id=spec.account_id,
        )
    now = ctx.now()
    grace = _period(spec.grace_period, "account.grace_period")
    retention = _period(spec.retention_period, "account.retention_period")
    await repo.insert_account(
        uow,
        Account(
            account_id=spec.account_id,
            display_name=spec.display_name,
            kind=kind,
            master_account_id=master,
            currency_code=currency,
            balance_micros=0,
            standing=Standing.GOOD,
            standing_change_time=None,
            grace_end_time=None,
            retention_end_time=None,
            grace_period=grace,
            retention_period=retention,
            balance_alert_micros=None,
            create_time=now,
            update_time=now,
        ),
    )
    account = await load_account(uow, spec.account_id)
    if kind == AccountKind.ENTERPRISE_MEMBER:
        await announce_member(ctx, uow, account)
    return account


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

    async def work(uow: UnitOfWork) -> list[Account]:
        ids = await repo.list_ids(uow, only, master_account_id, after_id, limit)
        return [await load_account(uow, i) for i in ids]

    return await ctx.db.read(work)


async def members_of(ctx: BillingContext, master_account_id: str) -> frozenset[str]:
    """The members of an enterprise master: the accounts its tokens may read
    (docs/security.md, "Masters and members")."""
    return frozenset(await ctx.db.read(lambda uow: repo.member_ids(uow, master_account_id)))


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
    before = await repo.get(uow, check_account_id(account_id), for_update=True)
    if before is None:
        raise account_not_found(account_id)
    if before.kind == AccountKind.ENTERPRISE_MEMBER:
        raise FailedPrecondition(
            "ACCOUNT_PAID_BY_MASTER",
            f"{account_id!r} is paid for by {before.master_account_id!r}: top up the master",
            master_account_id=before.master_account_id,
        )
    _check_amount(amount_micros, currency, before.currency_code, "amount")
    if amount_micros <= 0:
        raise InvalidArgument("amount", "a top-up must be positive")
    now = ctx.now()
    balance = before.balance_micros + amount_micros
    if balance > MAX_AMOUNT_MICROS:
        raise FailedPrecondition(
            "BALANCE_LIMIT",
            f"the balance may hold at most {MAX_AMOUNT_MICROS // MICROS_PER_UNIT} units",
            account_id=account_id,
        )
    good = balance >= 0 and before.standing != Standing.GOOD
    await repo.set_balance(
        uow, account_id, balance, now, ArrearsState(Standing.GOOD, now) if good else None
    )
    await ledger.book(
        uow,
        BillLine(
            kind=BillLineKind.TOP_UP,
            account_id=account_id,
            amount_micros=amount_micros,
            occur_time=now,
            description="top-up",
        ),
    )
    await balance_moved(ctx, uow, account_id, before.balance_micros, balance, now)
    account = await load_account(uow, account_id)
    if good:
        await announce_standing(ctx, uow, account, before.standing)
    return account


async def balance_moved(
    ctx: BillingContext, uow: UnitOfWork, payer_id: str, before: int, after: int, now: datetime
) -> None:
    """The balance alert after the paying balance moved from ``before`` to ``after`` (the
    account locked): any charge (pay-per-use, purchase, renewal) that takes it below the
    threshold emits ``balance_below_threshold`` once; the alert re-arms when the balance is at
    or above the threshold again (a top-up, a refund)."""
    threshold, fired, currency = await repo.balance_alert(uow, payer_id)
    if threshold is None:
        return
    if after < threshold and after < before and not fired:
        ctx.events.balance_below_threshold(uow, payer_id, after, threshold, currency, now)
        await repo.set_alert_fired(uow, payer_id, True)
    elif after >= threshold and fired:
        await repo.set_alert_fired(uow, payer_id, False)


async def announce_standing(
    ctx: BillingContext, uow: UnitOfWork, payer: Account, previous: Standing
) -> None:
    """account_standing_changed for the paying account and each of its members, each with
    its pay-per-use block (its own setting or the payer's) and master."""
    now = ctx.now()
    ctx.events.standing_changed(
        uow,
        payer.account_id,
        payer,
        previous,
        now,
        block_pay_per_use_in_grace=payer.block_pay_per_use_in_grace,
        monthly_spending_cap_micros=payer.monthly_spending_cap_micros,
        spending=await spending_of(ctx, uow, payer.account_id, payer.monthly_spending_cap_micros),
    )
    for account_id, own_block, own_cap in await repo.member_settings(uow, payer.account_id):
        ctx.events.standing_changed(
            uow,
            account_id,
            payer,
            previous,
            now,
            block_pay_per_use_in_grace=own_block or payer.block_pay_per_use_in_grace,
            master_account_id=payer.account_id,
            monthly_spending_cap_micros=own_cap,
            spending=await spending_of(ctx, uow, account_id, own_cap),
        )


async def spending_of(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, cap_micros: int
) -> tuple[str, dict[str, int]] | None:
    """(this month, the account's own settled pay-per-use of it by region) for an account with
    a spending cap; None without one (docs/design/spending-cap.md)."""
    if cap_micros <= 0:
        return None
    month = month_key(ctx.now(), ctx.tz)
    start, end = month_bounds(month, ctx.tz)
    return month, await month_usage.settled_by_region(uow, account_id, start, end)


async def announce_spending(ctx: BillingContext, uow: UnitOfWork, account: Account) -> None:
    """account_standing_changed for `account` alone (its standing unchanged) after its own
    pay-per-use was settled, when it has a spending cap: quota learns the month's settled
    charges of every region."""
    if account.monthly_spending_cap_micros <= 0:
        return
    if account.kind == AccountKind.ENTERPRISE_MEMBER:
        await announce_member(ctx, uow, account)
        return
    ctx.events.standing_changed(
        uow,
        account.account_id,
        account,
        account.standing,
        ctx.now(),
        block_pay_per_use_in_grace=account.block_pay_per_use_in_grace,
        monthly_spending_cap_micros=account.monthly_spending_cap_micros,
        spending=await spending_of(
            ctx, uow, account.account_id, account.monthly_spending_cap_micros
        ),
    )


async def announce_member(ctx: BillingContext, uow: UnitOfWork, member: Account) -> None:
    """account_standing_changed for one member whose standing did not change (a new member,
    or its own setting changed): quota learns its master and its pay-per-use block."""
    payer = await load_account(uow, member.master_account_id)
    ctx.events.standing_changed(
        uow,
        member.account_id,
        payer,
        payer.standing,
        ctx.now(),
        block_pay_per_use_in_grace=blocks_pay_per_use_in_grace(member, payer),
        master_account_id=payer.account_id,
        monthly_spending_cap_micros=member.monthly_spending_cap_micros,
        spending=await spending_of(ctx, uow, member.account_id, member.monthly_spending_cap_micros),
    )


# The fields UpdateAccount may change (update_mask paths).
UPDATABLE = frozenset({"display_name", "block_pay_per_use_in_grace"})


@dataclass(frozen=True)
class AccountSettings:
    """UpdateAccount's request: the account, the new values and the mask naming them."""

    account_id: str
    display_name: str
    block_pay_per_use_in_grace: bool
    paths: tuple[str, ...]


async def update_account(ctx: BillingContext, uow: UnitOfWork, spec: AccountSettings) -> Account:
    """Change the settings named by the mask. A change of the pay-per-use block is announced
    to quota (account_standing_changed, the standing unchanged): for a master, to its members
    too, whose effective block includes the master's."""
    check_account_id(spec.account_id, "account.account_id")
    if not spec.paths:
        raise InvalidArgument("update_mask", "name the fields to change")
    unknown = sorted(set(spec.paths) - UPDATABLE)
    if unknown:
        raise InvalidArgument(
            "update_mask",
            f"cannot change {', '.join(unknown)}; updatable: {', '.join(sorted(UPDATABLE))}",
        )
    if "display_name" in spec.paths:
        _check_display_name(spec.display_name)
    before = await repo.get(uow, spec.account_id, for_update=True)
    if before is None:
        raise account_not_found(spec.account_id)
    values: dict = {}
    if "display_name" in spec.paths:
        values["display_name"] = spec.display_name
    if "block_pay_per_use_in_grace" in spec.paths:
        values["block_pay_per_use_in_grace"] = spec.block_pay_per_use_in_grace
    await repo.update_settings(uow, spec.account_id, values, ctx.now())
    after = await load_account(uow, spec.account_id)
    if after.block_pay_per_use_in_grace != before.block_pay_per_use_in_grace:
        if after.kind == AccountKind.ENTERPRISE_MEMBER:
            await announce_member(ctx, uow, after)
        else:
            await announce_standing(ctx, uow, after, after.standing)
    return after


async def set_balance_alert(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    threshold_micros: int | None,
    currency: str,
) -> Account:
    """Set (or clear, with None) the balance alert; it fires when the balance drops below."""
    account = await repo.get(uow, check_account_id(account_id), for_update=True)
    if account is None:
        raise account_not_found(account_id)
    if threshold_micros is not None:
        _check_amount(threshold_micros, currency, account.currency_code, "threshold")
    await repo.set_balance_alert(uow, account_id, threshold_micros, ctx.now())
    return await load_account(uow, account_id)


async def set_spending_cap(
    ctx: BillingContext,
    uow: UnitOfWork,
    account_id: str,
    cap_micros: int,
    currency: str,
) -> Account:
    """Set (cap_micros > 0) or clear (0) the account's own monthly pay-per-use cap and announce
    it to quota in account_standing_changed (docs/design/spending-cap.md): the event carries
    the account's whole admission state, so quota's projection takes it with the rest."""
    check_account_id(account_id)
    if cap_micros < 0:
        raise InvalidArgument("monthly_amount", "monthly_amount must not be negative")
    before = await repo.get(uow, account_id, for_update=True)
    if before is None:
        raise account_not_found(account_id)
    _check_amount(cap_micros, currency, before.currency_code, "monthly_amount")
    await repo.update_settings(
        uow, account_id, {"monthly_spending_cap_micros": cap_micros}, ctx.now()
    )
    after = await load_account(uow, account_id)
    if after.monthly_spending_cap_micros != before.monthly_spending_cap_micros:
        if after.kind == AccountKind.ENTERPRISE_MEMBER:
            await announce_member(ctx, uow, after)
        else:
            await announce_standing(ctx, uow, after, after.standing)
    return after
