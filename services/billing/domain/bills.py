"""Bills: the lines that moved an account's balance in a month, and their CSV export.

What a bill holds (docs/design/billing.md)
==========================================

One **line** per settled hourly pay-per-use cycle of an account, region, API and enterprise
project (with its quantity, free calls and tier breakdown), one per package purchase, renewal
and refund (the cancellation of an order), and one per top-up. A line's ``amount_micros`` is
**signed by its effect** on the payer's balance, as in the ledger and on the wire: charges
(pay-per-use, purchase, renewal) are negative, credits (refund, top-up) positive; its kind
says which it is and ``charge_micros`` is the line's non-negative size (the CSV's ``amount``).

Amounts on lines are what left or entered the balance, so they are whole minor units of the
currency. A pay-per-use line is made by ``pay_per_use_line``, which rounds the cycle's exact
price half up to the minor unit, once per cycle; its tier prices keep the exact, unrounded
values, so they may differ from the line's charge by less than one minor unit.

**Who pays.** ``account_id`` is the account whose usage or order it is; ``payer_account_id`` is
the account whose balance moved: the enterprise master for a member under unified accounting,
else the account itself. A member's lines appear on its own bill (with no effect on its own
balance) and on its master's bill (where they explain the master's balance).

**Which month.** A line belongs to the month (billing time zone) of its ``bill_time``: the
start of the cycle for pay-per-use, the instant the money moved (``occur_time``) for the others.
The last hour of April is on April's bill although it is settled just after midnight. Opening
and closing balances are ledger balances in the same terms: the opening balance is the effect
of every line of earlier months, and **opening + the sum of the month's balance effects =
closing** (``check_bill``). ``total`` is what the month's usage and orders cost: charges minus
refunds, top-ups left out (docs/design/billing.md).
"""

from __future__ import annotations

import csv
import enum
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from services.billing.domain.cycles import cycle_end, cycle_start, month_bounds
from shared.money import format_amount, round_half_up_to_minor
from shared.pricing import Priced, TierCharge
from shared.validity import as_utc

__all__ = [
    "CSV_COLUMNS",
    "Bill",
    "BillLine",
    "BillLineKind",
    "UnbalancedBillError",
    "balance_effect_on",
    "bill_csv",
    "bill_total",
    "build_bill",
    "check_bill",
    "member_subtotals",
    "pay_per_use_line",
    "project_subtotals",
]


class BillLineKind(enum.IntEnum):
    """The values are those of ``BillLineKind`` in the protos."""

    PAY_PER_USE = 1
    PACKAGE_PURCHASE = 2
    PACKAGE_RENEWAL = 3
    REFUND = 4
    TOP_UP = 5


_CHARGES = frozenset(
    {BillLineKind.PAY_PER_USE, BillLineKind.PACKAGE_PURCHASE, BillLineKind.PACKAGE_RENEWAL}
)
_FOR_AN_ORDER = frozenset(
    {BillLineKind.PACKAGE_PURCHASE, BillLineKind.PACKAGE_RENEWAL, BillLineKind.REFUND}
)


@dataclass(frozen=True, kw_only=True)
class BillLine:
    """One line of a bill; ``amount_micros`` is the signed effect on the payer's balance.

    Pay-per-use lines carry the cycle, the region/API/project, the quantity (free calls
    included) and the tier breakdown; the other kinds carry no cycle and no tiers. Purchase,
    renewal and refund lines name their order.
    """

    kind: BillLineKind
    account_id: str
    amount_micros: int
    occur_time: datetime
    payer_account_id: str = ""  # "" = the account pays for itself
    region: str = ""
    api: str = ""
    enterprise_project_id: str = ""
    cycle_start: datetime | None = None
    cycle_end: datetime | None = None
    quantity: int = 0
    free_quantity: int = 0
    tiers: tuple[TierCharge, ...] = field(default=())
    order_id: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", BillLineKind(self.kind))
        object.__setattr__(self, "tiers", tuple(self.tiers))
        for name in ("occur_time", "cycle_start", "cycle_end"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value, name))
        if not self.account_id:
            raise ValueError("a bill line names its account")
        if isinstance(self.amount_micros, bool) or not isinstance(self.amount_micros, int):
            raise ValueError(f"amount_micros must be an int, got {self.amount_micros!r}")
        if (self.amount_micros > 0) if self.kind in _CHARGES else (self.amount_micros < 0):
            sign = "<= 0" if self.kind in _CHARGES else ">= 0"
            raise ValueError(f"a {self.kind.name} line's amount_micros must be {sign}")
        for name in ("quantity", "free_quantity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.kind == BillLineKind.PAY_PER_USE:
            self._check_pay_per_use()
        elif self.cycle_start or self.cycle_end or self.tiers or self.free_quantity:
            raise ValueError(f"a {self.kind.name} line has no cycle, tiers or free calls")
        if self.kind in _FOR_AN_ORDER and not self.order_id:
            raise ValueError(f"a {self.kind.name} line names its order")

    def _check_pay_per_use(self) -> None:
        if self.cycle_start is None or self.cycle_end is None:
            raise ValueError("a pay-per-use line has a cycle start and end")
        if not self.cycle_start < self.cycle_end:
            raise ValueError("a cycle ends after it starts")
        if not (self.region and self.api):
            raise ValueError("a pay-per-use line names its region and API")
        if self.quantity < 1:
            raise ValueError("a pay-per-use line has at least one call")
        if self.free_quantity + sum(t.quantity for t in self.tiers) != self.quantity:
            raise ValueError("free calls and tier quantities must add up to the quantity")

    @property
    def payer(self) -> str:
        """The account whose balance this line moved."""
        return self.payer_account_id or self.account_id

    @property
    def charge_micros(self) -> int:
        """The line's size, non-negative: what a charge cost, what a credit gave."""
        return abs(self.amount_micros)

    @property
    def bill_time(self) -> datetime:
        """The instant that places the line in a month: the cycle's start, else occur_time."""
        return self.cycle_start if self.cycle_start is not None else self.occur_time


def pay_per_use_line(
    *,
    account_id: str,
    region: str,
    api: str,
    enterprise_project_id: str,
    cycle: datetime,
    priced: Priced,
    currency: str,
    settle_time: datetime,
    tz: tzinfo,
    payer_account_id: str = "",
    description: str = "",
) -> BillLine:
    """Settle one hourly cycle: its line, with the price rounded half up to the minor unit.

    ``cycle`` is the cycle's start and ``priced`` the sum of its calls' prices
    (``pricing.merge_priced``). A cycle is settled only once it has ended, so ``settle_time``
    (the line's ``occur_time``, when the money leaves) must not be before the cycle's end.
    """
    start = as_utc(cycle, "cycle")
    if cycle_start(start, tz) != start:
        raise ValueError(f"{start.isoformat()} is not the start of an hourly cycle")
    end = cycle_end(start, tz)
    if as_utc(settle_time, "settle_time") < end:
        raise ValueError(f"the cycle {start.isoformat()} is settled after {end.isoformat()}")
    return BillLine(
        kind=BillLineKind.PAY_PER_USE,
        account_id=account_id,
        payer_account_id=payer_account_id,
        region=region,
        api=api,
        enterprise_project_id=enterprise_project_id,
        cycle_start=start,
        cycle_end=end,
        quantity=priced.quantity,
        free_quantity=priced.free_quantity,
        tiers=priced.tiers,
        amount_micros=-round_half_up_to_minor(priced.price_micros, currency),
        occur_time=settle_time,
        description=description,
    )


def balance_effect_on(line: BillLine, account_id: str | None) -> int:
    """``line``'s effect on ``account_id``'s balance; on its payer's when ``account_id`` is
    None. A member's line paid by its master does not move the member's balance."""
    if account_id is None or line.payer == account_id:
        return line.amount_micros
    return 0


def bill_total(lines: Iterable[BillLine]) -> int:
    """What the lines cost: charges minus refunds, in micros; top-ups are not costs."""
    return -sum(line.amount_micros for line in lines if line.kind != BillLineKind.TOP_UP)


def _subtotals(lines: Iterable[BillLine], key) -> tuple[tuple[str, int], ...]:
    sums: dict[str, int] = {}
    for line in lines:
        sums[key(line)] = sums.get(key(line), 0) + line.amount_micros
    return tuple(sorted(sums.items()))


def project_subtotals(lines: Iterable[BillLine]) -> tuple[tuple[str, int], ...]:
    """``(enterprise project, sum of amounts)`` per project of ``lines``, by project id.

    Every line counts under its own project, and a line of no project (a top-up; an order of
    a package for every project) under ``""``: the subtotals add up to the lines' sum, the
    bill's wire ``total``."""
    return _subtotals(lines, lambda line: line.enterprise_project_id)


def member_subtotals(lines: Iterable[BillLine]) -> tuple[tuple[str, int], ...]:
    """``(account, sum of amounts)`` per account whose usage or order ``lines`` are, by
    account id: on a master's bill, each member's spending and the master's own; they add up
    to the lines' sum."""
    return _subtotals(lines, lambda line: line.account_id)


class UnbalancedBillError(ValueError):
    """The lines do not explain the change of balance between opening and closing."""

    def __init__(self, opening: int, effects: int, closing: int) -> None:
        self.opening = opening
        self.effects = effects
        self.closing = closing
        self.difference = closing - opening - effects
        super().__init__(
            f"opening {opening} + line effects {effects} != closing {closing}"
            f" (off by {self.difference} micros)"
        )


def check_bill(
    opening_micros: int,
    lines: Iterable[BillLine],
    closing_micros: int,
    account_id: str | None = None,
) -> None:
    """Check that ``opening + sum of balance effects == closing``; raise otherwise.

    With ``account_id``, only effects on that account's balance count (see
    ``balance_effect_on``); without, every line's effect on its payer counts.
    """
    effects = sum(balance_effect_on(line, account_id) for line in lines)
    if opening_micros + effects != closing_micros:
        raise UnbalancedBillError(opening_micros, effects, closing_micros)


@dataclass(frozen=True)
class Bill:
    """An account's bill for one month; balances are in micros, lines in bill order."""

    account_id: str
    month: str
    currency: str
    opening_balance_micros: int
    closing_balance_micros: int
    lines: tuple[BillLine, ...]

    def __post_init__(self) -> None:
        check_bill(
            self.opening_balance_micros,
            self.lines,
            self.closing_balance_micros,
            self.account_id,
        )

    @property
    def total_micros(self) -> int:
        return bill_total(self.lines)


def _bill_order(line: BillLine) -> tuple:
    return (
        line.bill_time,
        line.kind,
        line.region,
        line.api,
        line.enterprise_project_id,
        line.account_id,
        line.order_id,
        line.occur_time,
    )


def build_bill(
    *,
    account_id: str,
    month: str,
    tz: tzinfo,
    currency: str,
    opening_balance_micros: int,
    lines: Iterable[BillLine],
) -> Bill:
    """The bill of ``account_id`` for ``month`` from its lines and its opening balance.

    ``lines`` are the month's lines of the account: its own and, for a master, those it paid
    for; a line of another month or of an unrelated account is a caller error (``ValueError``).
    The closing balance follows from the opening balance and the lines.
    """
    start, end = month_bounds(month, tz)
    chosen = tuple(sorted(lines, key=_bill_order))
    for line in chosen:
        if not start <= line.bill_time < end:
            raise ValueError(f"a line of {line.bill_time.isoformat()} is not in {month}")
        if account_id not in (line.account_id, line.payer):
            raise ValueError(f"a line of account {line.account_id!r} is not on {account_id}'s bill")
    closing = opening_balance_micros + sum(balance_effect_on(line, account_id) for line in chosen)
    return Bill(account_id, month, currency, opening_balance_micros, closing, chosen)


CSV_COLUMNS = (
    "kind",
    "account_id",
    "payer_account_id",
    "region",
    "api",
    "enterprise_project_id",
    "cycle_start_time",
    "cycle_end_time",
    "quantity",
    "free_quantity",
    "tiers",
    "amount",
    "balance_effect",
    "currency",
    "order_id",
    "description",
    "occur_time",
)

# A spreadsheet reads a cell starting with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str) -> str:
    """A free-text cell, defused: a leading quote keeps a spreadsheet from evaluating it."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _time(value: datetime | None, tz: tzinfo) -> str:
    return "" if value is None else value.astimezone(tz).isoformat()


def _tiers(tiers: Sequence[TierCharge]) -> str:
    """``tier:quantity@unit_price`` for each tier, ``;``-separated: ``1:1000@0.0025;2:5@0.002``."""
    return ";".join(f"{t.tier}:{t.quantity}@{t.unit_price}" for t in tiers)


def bill_csv(lines: Iterable[BillLine], currency: str, tz: tzinfo = UTC) -> str:
    """The lines as CSV (RFC 4180, CRLF line ends): a header row, then one row per line.

    Columns are ``CSV_COLUMNS``: ``amount`` is the line's size (``charge_micros``),
    ``balance_effect`` its signed ``amount_micros``. Amounts are plain decimals in ``currency``
    (``"-2.50"`` for a charge's balance effect), times RFC 3339 in ``tz`` (the billing time
    zone, say), the kind its short name (``PAY_PER_USE``). Text that a spreadsheet would take
    for a formula is prefixed with ``'``.
    """
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        writer.writerow(
            (
                line.kind.name,
                _text(line.account_id),
                _text(line.payer),
                _text(line.region),
                _text(line.api),
                _text(line.enterprise_project_id),
                _time(line.cycle_start, tz),
                _time(line.cycle_end, tz),
                line.quantity,
                line.free_quantity,
                _tiers(line.tiers),
                format_amount(line.charge_micros, currency),
                format_amount(line.amount_micros, currency),
                currency,
                _text(line.order_id),
                _text(line.description),
                _time(line.occur_time, tz),
            )
        )
    return out.getvalue()
