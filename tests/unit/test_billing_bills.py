"""Bills (docs/design/billing.md): lines, cycle settlement, the balance invariant, CSV export."""

import csv
import io
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.bills import (
    CSV_COLUMNS,
    BillLine,
    BillLineKind,
    UnbalancedBillError,
    balance_effect_on,
    bill_csv,
    bill_total,
    build_bill,
    check_bill,
    pay_per_use_line,
)
from services.billing.domain.cycles import cycle_end, cycle_start, month_bounds, month_key
from shared.catalog import PriceTier
from shared.money import to_micros
from shared.pricing import merge_priced, price_usage

SHANGHAI = ZoneInfo("Asia/Shanghai")
PLUS_8 = timezone(timedelta(hours=8))
TIERS = (
    PriceTier(up_to=1_000, unit_price=Decimal("0.0025")),
    PriceTier(up_to=None, unit_price=Decimal("0.0020")),
)
ACCOUNT = "acct-1"
REGION = "ap-southeast-1"
API = "passport"


def local(*args):
    return datetime(*args, tzinfo=PLUS_8)


def settle(calls, *, account=ACCOUNT, payer="", project="0", currency="USD", free=0):
    """What billing does with pay-per-use calls: rate each in order against the month's count,
    group by hourly cycle, and settle each cycle once it has ended."""
    counts: Counter[str] = Counter()
    by_cycle = defaultdict(list)
    for t in sorted(calls):
        month = month_key(t, SHANGHAI)
        by_cycle[cycle_start(t, SHANGHAI)].append(price_usage(TIERS, free, counts[month], 1))
        counts[month] += 1
    return [
        pay_per_use_line(
            account_id=account,
            payer_account_id=payer,
            region=REGION,
            api=API,
            enterprise_project_id=project,
            cycle=start,
            priced=merge_priced(parts),
            currency=currency,
            settle_time=cycle_end(start, SHANGHAI),
            tz=SHANGHAI,
        )
        for start, parts in sorted(by_cycle.items())
    ]


def purchase(at, amount="180.00", order="order-1", account=ACCOUNT):
    return BillLine(
        kind=BillLineKind.PACKAGE_PURCHASE,
        account_id=account,
        region=REGION,
        api=API,
        quantity=100_000,
        amount_micros=-to_micros(Decimal(amount)),
        order_id=order,
        description="passport-100k-1y",
        occur_time=at,
    )


def top_up(at, amount, account=ACCOUNT):
    return BillLine(
        kind=BillLineKind.TOP_UP,
        account_id=account,
        amount_micros=to_micros(Decimal(amount)),
        occur_time=at,
    )


def test_five_calls_at_0845_to_0855_make_one_line_0800_to_0900_of_quantity_5():
    calls = [local(2024, 5, 1, 8, minute) for minute in (45, 47, 50, 53, 55)]

    (line,) = settle(calls)

    assert line.kind == BillLineKind.PAY_PER_USE
    assert (line.cycle_start, line.cycle_end) == (local(2024, 5, 1, 8, 0), local(2024, 5, 1, 9, 0))
    assert line.quantity == 5
    # 5 x 0.0025 = 0.0125, rounded half up to the cent at settlement.
    assert line.tiers[0].price_micros == 12_500
    assert line.amount_micros == -10_000
    assert line.occur_time == local(2024, 5, 1, 9, 0)


def test_calls_at_095950_and_100010_make_two_lines():
    lines = settle([local(2024, 5, 1, 9, 59, 50), local(2024, 5, 1, 10, 0, 10)])

    assert [(line.cycle_start, line.quantity) for line in lines] == [
        (local(2024, 5, 1, 9, 0), 1),
        (local(2024, 5, 1, 10, 0), 1),
    ]


def test_pay_per_use_since_152916_then_a_package_at_163030():
    # Pay-per-use from 15:29:16 until the package bought at 16:30:30 pays for the calls.
    bought = local(2024, 5, 1, 16, 30, 30)
    calls = [local(2024, 5, 1, 15, 29, 16) + k * timedelta(minutes=1) for k in range(62)]
    assert all(t < bought for t in calls)
    lines = [*settle(calls), purchase(bought)]

    bill = build_bill(
        account_id=ACCOUNT,
        month="2024-05",
        tz=SHANGHAI,
        currency="USD",
        opening_balance_micros=to_micros(Decimal("500.00")),
        lines=lines,
    )

    assert [(line.kind, line.cycle_start, line.cycle_end) for line in bill.lines] == [
        (BillLineKind.PAY_PER_USE, local(2024, 5, 1, 15, 0), local(2024, 5, 1, 16, 0)),
        (BillLineKind.PAY_PER_USE, local(2024, 5, 1, 16, 0), local(2024, 5, 1, 17, 0)),
        (BillLineKind.PACKAGE_PURCHASE, None, None),
    ]
    assert [line.quantity for line in bill.lines[:2]] == [31, 31]
    # 31 x 0.0025 = 0.0775 -> 0.08 per cycle; 180.00 for the package.
    assert bill.total_micros == to_micros(Decimal("180.16"))
    assert bill.closing_balance_micros == to_micros(Decimal("319.84"))


def test_the_sum_of_lines_equals_the_change_in_balance():
    lines = [
        top_up(local(2024, 5, 2, 10, 0), "50.00"),
        purchase(local(2024, 5, 3, 10, 0)),
        BillLine(
            kind=BillLineKind.REFUND,
            account_id=ACCOUNT,
            amount_micros=to_micros(Decimal("180.00")),
            order_id="order-1",
            occur_time=local(2024, 5, 3, 11, 0),
        ),
        *settle([local(2024, 5, 4, 8, 30)] * 3),
    ]
    opening = to_micros(Decimal("10.00"))

    bill = build_bill(
        account_id=ACCOUNT,
        month="2024-05",
        tz=SHANGHAI,
        currency="USD",
        opening_balance_micros=opening,
        lines=lines,
    )

    assert bill.closing_balance_micros - bill.opening_balance_micros == sum(
        line.amount_micros for line in lines
    )
    assert bill.closing_balance_micros == to_micros(Decimal("59.99"))
    check_bill(opening, lines, bill.closing_balance_micros)
    # Charges minus refunds: the package was refunded, 0.0075 of calls rounded to 0.01.
    assert bill.total_micros == 10_000


def test_check_bill_names_the_difference():
    lines = [top_up(local(2024, 5, 2, 10, 0), "5.00")]

    with pytest.raises(UnbalancedBillError) as caught:
        check_bill(0, lines, to_micros(Decimal("4.99")))

    assert caught.value.difference == -10_000


def test_balance_effects_by_kind():
    at = local(2024, 5, 2, 10, 0)
    charge = purchase(at)
    renewal = BillLine(
        kind=BillLineKind.PACKAGE_RENEWAL,
        account_id=ACCOUNT,
        amount_micros=-1_000_000,
        order_id="o-2",
        occur_time=at,
    )
    refund = BillLine(
        kind=BillLineKind.REFUND,
        account_id=ACCOUNT,
        amount_micros=1_000_000,
        order_id="o-2",
        occur_time=at,
    )
    (usage,) = settle([at, at])  # 2 x 0.0025 = 0.005 -> 0.01

    assert charge.amount_micros == -180_000_000
    assert renewal.amount_micros == -1_000_000
    assert usage.amount_micros == -10_000
    assert refund.amount_micros == 1_000_000
    assert top_up(at, "3.00").amount_micros == 3_000_000
    assert (charge.charge_micros, refund.charge_micros) == (180_000_000, 1_000_000)
    with pytest.raises(ValueError, match="must be <= 0"):
        BillLine(
            kind=BillLineKind.PACKAGE_RENEWAL,
            account_id=ACCOUNT,
            amount_micros=1_000_000,
            order_id="o-2",
            occur_time=at,
        )
    assert bill_total([charge, renewal, usage, refund, top_up(at, "3.00")]) == 180_010_000


def test_a_member_pays_through_its_master():
    lines = settle([local(2024, 5, 1, 8, 45)] * 2, account="member-1", payer="master-1")
    (line,) = lines
    assert line.payer == "master-1"
    assert balance_effect_on(line, "member-1") == 0
    assert balance_effect_on(line, "master-1") == -10_000

    # On the member's bill the line is listed but its own balance does not move ...
    member = build_bill(
        account_id="member-1",
        month="2024-05",
        tz=SHANGHAI,
        currency="USD",
        opening_balance_micros=0,
        lines=lines,
    )
    assert member.closing_balance_micros == 0
    assert member.total_micros == 10_000
    # ... and the master's bill explains its balance with the member's line.
    master = build_bill(
        account_id="master-1",
        month="2024-05",
        tz=SHANGHAI,
        currency="USD",
        opening_balance_micros=1_000_000,
        lines=lines,
    )
    assert master.closing_balance_micros == 990_000


def test_the_last_hour_of_a_month_is_on_that_months_bill():
    (line,) = settle([local(2024, 4, 30, 23, 30)])
    assert line.occur_time == local(2024, 5, 1, 0, 0)  # settled in May ...
    assert month_key(line.bill_time, SHANGHAI) == "2024-04"  # ... billed in April

    april = build_bill(
        account_id=ACCOUNT,
        month="2024-04",
        tz=SHANGHAI,
        currency="USD",
        opening_balance_micros=0,
        lines=[line],
    )
    assert april.lines == (line,)
    with pytest.raises(ValueError, match="not in 2024-05"):
        build_bill(
            account_id=ACCOUNT,
            month="2024-05",
            tz=SHANGHAI,
            currency="USD",
            opening_balance_micros=0,
            lines=[line],
        )


def test_a_line_of_another_account_is_refused():
    with pytest.raises(ValueError, match="acct-2"):
        build_bill(
            account_id=ACCOUNT,
            month="2024-05",
            tz=SHANGHAI,
            currency="USD",
            opening_balance_micros=0,
            lines=[top_up(local(2024, 5, 2, 10, 0), "1.00", account="acct-2")],
        )


def test_settlement_rounds_half_up_to_the_minor_unit_of_the_currency():
    # A lone call at 0.0025 rounds to nothing: rounding is per cycle (docs/design/billing.md).
    assert settle([local(2024, 5, 1, 8, 45)])[0].amount_micros == 0
    calls = [local(2024, 5, 1, 8, 45)] * 3  # 0.0075

    assert settle(calls)[0].amount_micros == -10_000  # USD: 0.01
    assert settle(calls, currency="JPY")[0].amount_micros == 0  # JPY: 0
    assert settle(calls * 200, currency="JPY")[0].amount_micros == -2_000_000  # 1.5 -> 2
    assert settle(calls, currency="BHD")[0].amount_micros == -8_000  # BHD: 0.008


def test_free_calls_are_on_the_line():
    (line,) = settle([local(2024, 5, 1, 8, 45)] * 5, free=3)

    assert (line.quantity, line.free_quantity) == (5, 3)
    assert line.amount_micros == -10_000  # 2 x 0.0025 = 0.005 -> 0.01


def test_a_cycle_is_settled_only_after_it_ends():
    priced = price_usage(TIERS, 0, 0, 1)
    args = dict(
        account_id=ACCOUNT,
        region=REGION,
        api=API,
        enterprise_project_id="0",
        priced=priced,
        currency="USD",
        tz=SHANGHAI,
    )
    with pytest.raises(ValueError, match="settled after"):
        pay_per_use_line(
            cycle=local(2024, 5, 1, 8, 0), settle_time=local(2024, 5, 1, 8, 59, 59), **args
        )
    with pytest.raises(ValueError, match="not the start"):
        pay_per_use_line(
            cycle=local(2024, 5, 1, 8, 30), settle_time=local(2024, 5, 1, 10, 0), **args
        )


@pytest.mark.parametrize(
    "fields",
    [
        dict(kind=BillLineKind.PAY_PER_USE, region=REGION, api=API, quantity=1),  # no cycle
        dict(kind=BillLineKind.TOP_UP, amount_micros=-1),
        dict(kind=BillLineKind.PACKAGE_PURCHASE),  # no order
        dict(kind=BillLineKind.REFUND),  # no order
        dict(kind=BillLineKind.TOP_UP, cycle_start=local(2024, 5, 1, 8, 0)),
        dict(kind=BillLineKind.TOP_UP, account_id=""),
        dict(kind=BillLineKind.TOP_UP, quantity=-1),
    ],
)
def test_malformed_lines_are_refused(fields):
    values = dict(account_id=ACCOUNT, amount_micros=0, occur_time=local(2024, 5, 1, 8, 0))
    values.update(fields)
    with pytest.raises(ValueError):
        BillLine(**values)


def test_a_pay_per_use_line_adds_up():
    with pytest.raises(ValueError, match="add up"):
        BillLine(
            kind=BillLineKind.PAY_PER_USE,
            account_id=ACCOUNT,
            region=REGION,
            api=API,
            cycle_start=local(2024, 5, 1, 8, 0),
            cycle_end=local(2024, 5, 1, 9, 0),
            quantity=5,
            tiers=price_usage(TIERS, 0, 0, 4).tiers,
            amount_micros=-10_000,
            occur_time=local(2024, 5, 1, 9, 0),
        )


def test_csv_has_a_header_and_one_row_per_line():
    bought = local(2024, 5, 1, 16, 30, 30)
    calls = [local(2024, 5, 1, 15, 29, 16) + k * timedelta(minutes=1) for k in range(62)]
    lines = [*settle(calls), purchase(bought), top_up(local(2024, 5, 2, 9, 0), "20")]

    text = bill_csv(lines, "USD", tz=SHANGHAI)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))

    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert len(rows) == len(lines) == 4
    first = rows[0]
    assert first["kind"] == "PAY_PER_USE"
    assert first["cycle_start_time"] == "2024-05-01T15:00:00+08:00"
    assert first["cycle_end_time"] == "2024-05-01T16:00:00+08:00"
    assert first["occur_time"] == "2024-05-01T16:00:00+08:00"
    assert (first["quantity"], first["free_quantity"]) == ("31", "0")
    assert first["tiers"] == "1:31@0.0025"
    assert (first["amount"], first["balance_effect"]) == ("0.08", "-0.08")
    assert first["payer_account_id"] == ACCOUNT
    assert first["enterprise_project_id"] == "0"
    assert rows[2]["kind"] == "PACKAGE_PURCHASE"
    assert (rows[2]["amount"], rows[2]["balance_effect"]) == ("180.00", "-180.00")
    assert rows[2]["cycle_start_time"] == ""
    assert rows[2]["order_id"] == "order-1"
    assert (rows[3]["kind"], rows[3]["balance_effect"]) == ("TOP_UP", "20.00")
    assert {row["currency"] for row in rows} == {"USD"}


def test_csv_amounts_follow_the_currency_and_times_default_to_utc():
    (line,) = settle([local(2024, 5, 1, 8, 45)] * 600, currency="JPY")  # 1.5 -> 2

    (row,) = csv.DictReader(io.StringIO(bill_csv([line], "JPY"), newline=""))

    assert (row["amount"], row["balance_effect"]) == ("2", "-2")
    assert row["cycle_start_time"] == "2024-05-01T00:00:00+00:00"


def test_csv_defuses_text_a_spreadsheet_would_run():
    line = BillLine(
        kind=BillLineKind.TOP_UP,
        account_id=ACCOUNT,
        amount_micros=1_000_000,
        description='=HYPERLINK("http://evil.example")',
        occur_time=local(2024, 5, 2, 9, 0),
    )
    (usage,) = settle([local(2024, 5, 1, 8, 45)] * 2, project="-1")

    rows = list(csv.DictReader(io.StringIO(bill_csv([line, usage], "USD"), newline="")))

    assert rows[0]["description"] == '\'=HYPERLINK("http://evil.example")'
    assert rows[1]["enterprise_project_id"] == "'-1"
    assert rows[1]["balance_effect"] == "-0.01"  # numbers are left alone


def test_an_empty_bill_is_just_the_header():
    assert bill_csv([], "USD") == ",".join(CSV_COLUMNS) + "\r\n"


# --- property: bills chain month to month ---------------------------------------------------

line_specs = st.lists(
    st.tuples(
        st.sampled_from(list(BillLineKind)),
        st.integers(0, 3 * 31 * 24 * 60),  # minutes into the three months
        st.integers(0, 10_000),  # cents
    ),
    max_size=40,
)


def _line(kind, minutes, cents):
    at = datetime(2024, 3, 31, 16, 0, tzinfo=UTC) + timedelta(minutes=minutes)  # 2024-04-01 +08
    if kind == BillLineKind.PAY_PER_USE:
        start = cycle_start(at, SHANGHAI)
        return BillLine(
            kind=kind,
            account_id=ACCOUNT,
            region=REGION,
            api=API,
            enterprise_project_id="0",
            cycle_start=start,
            cycle_end=cycle_end(start, SHANGHAI),
            quantity=1,
            free_quantity=1,
            amount_micros=-cents * 10_000,
            occur_time=cycle_end(start, SHANGHAI),
        )
    sign = 1 if kind in (BillLineKind.REFUND, BillLineKind.TOP_UP) else -1
    return BillLine(
        kind=kind,
        account_id=ACCOUNT,
        amount_micros=sign * cents * 10_000,
        order_id="o",
        occur_time=at,
    )


@given(line_specs, st.integers(-(10**8), 10**8))
def test_each_months_closing_balance_is_the_next_months_opening(specs, opening):
    """Lines are placed in months by bill time; chaining the bills of April, May and June
    from one opening balance ends at the opening plus every line's effect."""
    lines = [_line(*spec) for spec in specs]
    balance = opening
    placed = 0
    for month in ("2024-04", "2024-05", "2024-06", "2024-07"):
        start, end = month_bounds(month, SHANGHAI)
        mine = [line for line in lines if start <= line.bill_time < end]
        bill = build_bill(
            account_id=ACCOUNT,
            month=month,
            tz=SHANGHAI,
            currency="USD",
            opening_balance_micros=balance,
            lines=mine,
        )
        check_bill(bill.opening_balance_micros, bill.lines, bill.closing_balance_micros)
        assert list(bill.lines) == sorted(bill.lines, key=lambda line: line.bill_time)
        balance = bill.closing_balance_micros
        placed += len(mine)

    assert placed == len(lines)
    assert balance == opening + sum(line.amount_micros for line in lines)
