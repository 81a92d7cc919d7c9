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

A project filter (`enterprise_project_id`) shows only that project's lines, with the same
consequences: `total` is the sum of the lines shown, the balances are unset. Every bill carries
its lines' sums per enterprise project (a line of no project, such as a top-up, under ``""``),
and a master's bill its lines' sums per account (each member's, and the master's own); both add
up to `total` (docs/design/billing.md, "Bills").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import tzinfo

from services.billing.adapters import ledger_repository as ledger
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.domain.accounts import Account, AccountKind
from services.billing.domain.bills import (
    Bill,
    BillLine,
    UnbalancedBillError,
    bill_csv,
    build_bill,
    member_subtotals,
    project_subtotals,
)
from services.billing.domain.cycles import month_bounds, parse_month
from shared.db import UnitOfWork
from shared.errors import InvalidArgument
from shared.projects import check_project_filter

Subtotals = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ShownBill:
    """A bill as one caller may see it: the ``lines`` it shows (all, a region-limited token's,
    or one project's), whether the balances are shown (not for a member, a region-limited
    token or a project filter), and the shown lines' sums per project and, on a master's
    bill, per account (``(key, micros)`` pairs by key)."""

    bill: Bill
    lines: tuple[BillLine, ...]
    shows_balances: bool
    project_subtotals: Subtotals = ()
    member_subtotals: Subtotals = ()


def check_month(month: str, tz: tzinfo) -> str:
    """``"YYYY-MM"`` (a month with a following one: 9999-12 has none) or INVALID_ARGUMENT
    naming the field ``month``."""
    try:
        parse_month(month)
        month_bounds(month, tz)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument("month", str(exc)) from None
    return month


async def _read(
    ctx: BillingContext, uow: UnitOfWork, account_id: str, month: str
) -> tuple[Bill, Account]:
    account = await accounts.load_account(uow, account_id)
    start, end = month_bounds(month, ctx.tz)
    lines = await ledger.month_lines(uow, account_id, start, end)
    has_balance = account.kind != AccountKind.ENTERPRISE_MEMBER
    opening = await ledger.effects_before(uow, account_id, start) if has_balance else 0
    bill = build_bill(
        account_id=account_id,
        month=month,
        tz=ctx.tz,
        currency=account.currency_code,
        opening_balance_micros=opening,
        lines=lines,
    )
    if has_balance:
        # The lines must explain the ledger's own effects: a line whose sign disagrees with its
        # kind would make the bill lie.
        ledger_closing = opening + sum(
            line.amount_micros for line in lines if line.payer == account_id
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
    ctx: BillingContext,
    account_id: str,
    month: str,
    regions: frozenset[str] | None = None,
    project: str = "",
) -> str:
    """The bill as CSV: a header row, then one row per line shown (times in the billing time
    zone); the ``enterprise_project_id`` column names each line's project."""
    shown = await shown_bill(ctx, account_id, month, regions, project)
    return bill_csv(shown.lines, shown.bill.currency, ctx.tz)


async def shown_bill(
    ctx: BillingContext,
    account_id: str,
    month: str,
    regions: frozenset[str] | None = None,
    project: str = "",
) -> ShownBill:
    """GetBill: the bill as a token valid in `regions` may see it, only `project`'s lines
    when `project` is not empty."""
    check_month(month, ctx.tz)
    project = check_project_filter(project)
    bill, account = await ctx.db.read(lambda uow: _read(ctx, uow, account_id, month))
    lines = visible_lines(bill.lines, regions)
    if project:
        lines = tuple(line for line in lines if line.enterprise_project_id == project)
    whole = regions is None and not project
    return ShownBill(
        bill,
        lines,
        shows_balances=whole and account.kind != AccountKind.ENTERPRISE_MEMBER,
        project_subtotals=project_subtotals(lines),
        member_subtotals=(
            member_subtotals(lines) if account.kind == AccountKind.ENTERPRISE_MASTER else ()
        ),
    )
