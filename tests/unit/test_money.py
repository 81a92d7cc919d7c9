"""Money in micro-units (docs/design/billing.md): conversion, minor units, rounding, formatting."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.money import (
    MAX_ABS_MICROS,
    MICROS_PER_UNIT,
    MoneyError,
    format_amount,
    from_micros,
    minor_unit_digits,
    minor_unit_micros,
    round_half_up_to_minor,
    to_micros,
)

micros = st.integers(-(10**15), 10**15)
currencies = st.sampled_from(("USD", "EUR", "CNY", "JPY", "KRW", "BHD", "KWD", "CLF", "XYZ"))


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (Decimal("0.0025"), 2_500),
        (Decimal("180.00"), 180_000_000),
        (Decimal("0.000001"), 1),
        (Decimal("-1.5"), -1_500_000),
        (Decimal("1.50000000"), 1_500_000),  # trailing zeros are not decimals
        (Decimal("1E+3"), 1_000_000_000),
        (Decimal("-0"), 0),
        (Decimal("0E+1000000"), 0),
        (3, 3_000_000),
        (Decimal("9223372036854.775807"), MAX_ABS_MICROS),
    ],
)
def test_to_micros_is_exact(amount, expected):
    assert to_micros(amount) == expected


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("0.0000001"),
        Decimal("1.0000001"),
        Decimal("0.00000050"),
        Decimal("1E-1000000"),
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1E+30"),
        Decimal("9223372036854.775808"),
        -(10**13),
    ],
)
def test_to_micros_refuses_what_it_cannot_hold_exactly(amount):
    with pytest.raises(MoneyError):
        to_micros(amount)


@pytest.mark.parametrize("amount", [0.1, True, "1.00", None])
def test_to_micros_refuses_floats_and_other_types(amount):
    with pytest.raises(TypeError):
        to_micros(amount)


def test_from_micros_is_exact_with_six_decimals():
    assert from_micros(2_500) == Decimal("0.0025")
    assert str(from_micros(2_500)) == "0.002500"
    assert from_micros(-1_500_000) == Decimal("-1.5")
    assert from_micros(MAX_ABS_MICROS) == Decimal("9223372036854.775807")
    assert from_micros(10**40 + 1) == Decimal("10000000000000000000000000000000000.000001")


@given(micros)
def test_micros_round_trip(value):
    assert to_micros(from_micros(value)) == value


@given(
    st.decimals(
        allow_nan=False, allow_infinity=False, places=6, min_value=-(10**9), max_value=10**9
    )
)
def test_decimals_with_six_places_round_trip(amount):
    assert from_micros(to_micros(amount)) == amount


@pytest.mark.parametrize(
    ("currency", "digits"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("CNY", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("XYZ", 2),  # not in the table: the default
        ("jpy", 0),
    ],
)
def test_minor_unit_digits_follow_iso_4217(currency, digits):
    assert minor_unit_digits(currency) == digits
    assert minor_unit_micros(currency) == 10 ** (6 - digits)


@pytest.mark.parametrize(
    ("currency", "value", "expected"),
    [
        ("USD", 1_005_000, 1_010_000),  # 1.005 -> 1.01: half goes up
        ("USD", 1_004_999, 1_000_000),
        ("USD", 1_005_001, 1_010_000),
        ("USD", 5_000, 10_000),  # 0.005 -> 0.01
        ("USD", 4_999, 0),
        ("USD", 7_500, 10_000),  # three calls at 0.0025
        ("USD", 1_230_000, 1_230_000),  # already whole cents
        ("USD", 0, 0),
        ("JPY", 1_500_000, 2_000_000),
        ("JPY", 1_499_999, 1_000_000),
        ("BHD", 1_000_500, 1_001_000),
        ("BHD", 1_000_499, 1_000_000),
    ],
)
def test_round_half_up_to_minor(currency, value, expected):
    assert round_half_up_to_minor(value, currency) == expected


@pytest.mark.parametrize(
    ("currency", "value", "expected"),
    [
        # Negative amounts round half away from zero: the mirror image of the positive ones.
        ("USD", -1_005_000, -1_010_000),
        ("USD", -1_004_999, -1_000_000),
        ("USD", -5_000, -10_000),
        ("USD", -4_999, 0),
        ("JPY", -500_000, -1_000_000),
        ("JPY", -499_999, 0),
    ],
)
def test_negative_amounts_round_half_away_from_zero(currency, value, expected):
    assert round_half_up_to_minor(value, currency) == expected


@given(micros, currencies)
def test_rounding_properties(value, currency):
    step = minor_unit_micros(currency)
    rounded = round_half_up_to_minor(value, currency)
    assert rounded % step == 0
    assert 2 * abs(rounded - value) <= step
    # Exactly half a minor unit away only when the amount was exactly half-way, and then away
    # from zero.
    if 2 * abs(rounded - value) == step:
        assert abs(rounded) > abs(value)
    assert round_half_up_to_minor(-value, currency) == -rounded
    assert round_half_up_to_minor(rounded, currency) == rounded


@pytest.mark.parametrize(
    ("value", "currency", "text"),
    [
        (1_500_000, "USD", "1.50"),
        (0, "USD", "0.00"),
        (10_000, "USD", "0.01"),
        (-10_000, "USD", "-0.01"),
        (180_000_000, "CNY", "180.00"),
        (1_234_500, "USD", "1.2345"),  # finer than a cent: shown, never rounded away
        (1, "USD", "0.000001"),
        (1_500_000_000, "JPY", "1500"),
        (-3_000_000, "JPY", "-3"),
        (1_500_000, "JPY", "1.5"),
        (1_001_000, "BHD", "1.001"),
        (2_000_000, "KWD", "2.000"),
        (123_456_789_000_000, "USD", "123456789.00"),
    ],
)
def test_format_amount(value, currency, text):
    assert format_amount(value, currency) == text


@given(micros, currencies)
def test_format_amount_reads_back_as_the_same_amount(value, currency):
    text = format_amount(value, currency)
    assert to_micros(Decimal(text)) == value
    decimals = text.partition(".")[2]
    assert len(decimals) >= minor_unit_digits(currency)


def test_a_unit_is_a_million_micros():
    assert MICROS_PER_UNIT == 1_000_000
