"""Use cases of bills: an account's bill for a calendar month, and its CSV export.

A bill is read from the ledger, where every change of a balance is a line signed by its effect
(``accounts.py``): the month's lines of the account (billing time zone; a pay-per-use line
belongs to the month its cycle starts in, any other line to the month it was booked in, see
``domain/bills.py``) and, for an enterprise master, the lines it paid for its members. The
opening balance is the sum of the paying account's ledger effects placed before the month, the
closing balance the opening plus the month's effects, so ``opening + lines = closing`` holds by
construction and is checked (``domain.bills.check_bill``) against the ledger's own sums.

An enterprise member has no balance: its bill lists its own lines (their amounts are the effect
on its master's balance) and leaves the balances unset. Cycles not settled yet are not on the
bill: a bill shows what the balance paid.

A region-limited token (docs/security.md, "Region scope on every read") sees the lines of its
regions and the lines that belong to no region (top-ups); lines of other regions are left out.
Its bill's `total` is the sum of the lines it shows, and the opening and closing balances are
left unset (as for a member): they are account-wide and the lines shown would not explain them.
The whole bill is read and checked first, so the ledger check still covers every line.
"""

from __future__ import annotations

import json
from datetime import tzinfo
from decimal import Decimal

from allot.billing.v1 import billing_pb2
from sqlalchemy import and_, func, or_, select

from services.billing.adapters import tables as t
from services.billing.adapters.events import micros_to_money
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.domain.bills import (
    Bill,
    BillLine,
    BillLineKind,
    UnbalancedBillError,
    bill_csv,
    build_bill,
)
from services.billing.domain.cycles import month_bounds, parse_month
from services.billing.domain.pricing import TierCharge
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.money import to_micros
from shared.timeutil import from_epoch_us, to_epoch_us, to_timestamp


def check_month(month: str, tz: tzinfo) -> str:
    """``"YYYY-MM"`` (a month with a following one: 9999-12 has none) or INVALID_ARGUMENT
    naming the field ``month``."""
    try:
        parse_month(month)
        month_bounds(month, tz)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument("month", str(exc)) from None
    return month


def _tiers(text: str) -> tuple[TierCharge, ...]:
    return tuple(
        TierCharge(
            int(item["tier"]),
            int(item["quantity"]),
            Decimal(item["unit_price"]),
            int(item["amount_micros"]),
        )
        for item in json.loads(text or "[]")
    )


def to_line(row) -> BillLine:
    """A ledger row as a bill line (ledger amounts are signed; lines carry the size)."""
    kind = BillLineKind(row.kind)
    payer = "" if row.paying_account_id == row.account_id else row.paying_account_id
    common = {
        "kind": kind,
        "account_id": row.account_id,
        "payer_account_id": payer,
        "amount_micros": abs(row.amount_micros),
        "occur_time": from_epoch_us(row.occur_time_us),
        "region": row.region,
        "api": row.api,
        "enterprise_project_id": row.enterprise_project_id,
        "quantity": row.quantity,
        "order_id": row.order_id,
        "description": row.description,
    }
    if kind != BillLineKind.PAY_PER_USE:
        return BillLine(**common)
    tiers = _tiers(row.tiers)
    return BillLine(
        **common,
        cycle_start=from_epoch_us(row.cycle_start_us),
        cycle_end=from_epoch_us(row.cycle_end_us),
        tiers=tiers,
        free_quantity=row.quantity - sum(charge.quantity for charge in tiers),
    )


def _bill_time():
    """Where a ledger line falls in the calendar: its cycle's start, else its booking."""
    lg = t.ledger.c
    return func.coalesce(lg.cycle_start_us, lg.occur_time_us)


async def _effects_before(uow: UnitOfWork, payer_id: str, before_us: int) -> int:
    lg = t.ledger.c
    total = await uow.session.execute(
        select(func.coalesce(func.sum(lg.amount_micros), 0)).where(
            lg.paying_account_id == payer_id, _bill_time() < before_us
        )
    )
    return int(total.scalar_one())


async def _read(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, month: str
) -> tuple[Bill, accounts.Account]:
    account = await accounts.load_account(uow, account_id)
    start, end = month_bounds(month, ctx.tz)
    start_us, end_us = to_epoch_us(start), to_epoch_us(end)
    lg = t.ledger.c
    rows = (
        await uow.session.execute(
            select(t.ledger).where(
                or_(lg.account_id == account_id, lg.paying_account_id == account_id),
                # Booked at or after the start of the month (a cycle is settled after it ends).
                lg.occur_time_us >= start_us,
                and_(_bill_time() >= start_us, _bill_time() < end_us),
            )
        )
    ).all()
    has_balance = account.kind != accounts.AccountKind.ENTERPRISE_MEMBER
    opening = await _effects_before(uow, account_id, start_us) if has_balance else 0
    bill = build_bill(
        account_id=account_id,
        month=month,
        tz=ctx.tz,
        currency=account.currency_code,
        opening_balance_micros=opening,
        lines=[to_line(row) for row in rows],
    )
    if has_balance:
        # The lines must explain the ledger's own effects: a line whose sign disagrees with its
        # kind would make the bill lie.
        ledger_closing = opening + sum(
            r.amount_micros for r in rows if r.paying_account_id == account_id
        )
        if ledger_closing != bill.closing_balance_micros:
            raise UnbalancedBillError(
                opening, ledger_closing - opening, bill.closing_balance_micros
            )
    return bill, account


async def get_bill(ctx: BillingContext, account_id: str, month: str) -> Bill:
    """The bill of ``account_id`` for ``month`` ("YYYY-MM", billing time zone)."""
    check_month(month, ctx.tz)
    bill, _ = await ctx.db.read(lambda uow: _read(ctx, uow, account_id, month))
    return bill


def visible_lines(
    lines: tuple[BillLine, ...], regions: frozenset[str] | None
) -> tuple[BillLine, ...]:
    """The lines a token valid in `regions` sees (every line when None): those of its
    regions and those of no region."""
    if regions is None:
        return lines
    return tuple(line for line in lines if not line.region or line.region in regions)


async def export_bill(
    ctx: BillingContext, account_id: str, month: str, regions: frozenset[str] | None = None
) -> str:
    """The bill as CSV: a header row, then one row per line (times in the billing time zone)."""
    bill = await get_bill(ctx, account_id, month)
    return bill_csv(visible_lines(bill.lines, regions), bill.currency, ctx.tz)


# --- the wire form (belongs in api/convert.py; kept here until the servicer is wired) ------


def to_proto_line(line: BillLine, currency: str) -> billing_pb2.BillLine:
    message = billing_pb2.BillLine(
        kind=int(line.kind),
        account_id=line.account_id,
        region=line.region,
        api=line.api,
        enterprise_project_id=line.enterprise_project_id,
        quantity=line.quantity,
        free_quantity=line.free_quantity,
        amount=micros_to_money(line.balance_effect, currency),
        order_id=line.order_id,
        description=line.description,
        occur_time=to_timestamp(line.occur_time),
        tiers=[
            billing_pb2.BillLineTier(
                tier=charge.tier,
                quantity=charge.quantity,
                unit_price=micros_to_money(to_micros(charge.unit_price), currency),
                amount=micros_to_money(charge.amount_micros, currency),
            )
            for charge in line.tiers
        ],
    )
    if line.cycle_start is not None:
        message.cycle_start_time.CopyFrom(to_timestamp(line.cycle_start))
    if line.cycle_end is not None:
        message.cycle_end_time.CopyFrom(to_timestamp(line.cycle_end))
    return message


def to_proto_bill(
    bill: Bill,
    has_balance: bool,
    ctx: BillingContext,
    lines: tuple[BillLine, ...] | None = None,
) -> billing_pb2.Bill:
    """The wire form of `bill`, showing `lines` (all of its lines when None)."""
    start, end = month_bounds(bill.month, ctx.tz)
    currency = bill.currency
    lines = bill.lines if lines is None else lines
    message = billing_pb2.Bill(
        account_id=bill.account_id,
        month=bill.month,
        currency_code=currency,
        lines=[to_proto_line(line, currency) for line in lines],
        # The lines' amounts are their effects on the paying balance: their sum.
        total=micros_to_money(sum(line.balance_effect for line in lines), currency),
        start_time=to_timestamp(start),
        end_time=to_timestamp(end),
    )
    if has_balance:
        message.opening_balance.CopyFrom(micros_to_money(bill.opening_balance_micros, currency))
        message.closing_balance.CopyFrom(micros_to_money(bill.closing_balance_micros, currency))
    return message


async def get_bill_message(
    ctx: BillingContext, account_id: str, month: str, regions: frozenset[str] | None = None
) -> billing_pb2.Bill:
    """GetBill: the bill in its wire form, as a token valid in `regions` may see it."""
    check_month(month, ctx.tz)
    bill, account = await ctx.db.read(lambda uow: _read(ctx, uow, account_id, month))
    if regions is not None:
        return to_proto_bill(bill, False, ctx, visible_lines(bill.lines, regions))
    return to_proto_bill(bill, account.kind != accounts.AccountKind.ENTERPRISE_MEMBER, ctx)
