"""Money as exact integers: amounts in micro-units, and the minor unit of each currency.

Inside billing every amount is an ``int`` of **micro-units**: 1 unit of the currency (one
dollar, one yuan, one yen) is 1,000,000 micros. Decimal strings from the catalog or the wire
become micros exactly or not at all: an amount with more than six decimals is refused rather
than rounded, so nothing is lost silently. Floats never take part.

Money leaves the system in the currency's **minor unit** (ISO 4217 exponent: cents for USD, EUR
and CNY; whole yen and won; fils with three decimals for BHD and KWD). Rounding to it happens in
exactly one place, ``round_half_up_to_minor``, which settlement of a pay-per-use cycle calls
once per cycle (docs/design/billing.md). It rounds **half away from zero**: 1.005 USD becomes 1.01
and -1.005 becomes -1.01, so rounding commutes with negation and a credit that reverses a charge
rounds to exactly the charge. ``format_amount`` never rounds: it writes the exact amount with the
currency's minor digits, and more digits only when the amount is finer than the minor unit, so a
value that should have been rounded is visible instead of hidden.
"""

from __future__ import annotations

from decimal import Decimal
from types import MappingProxyType

__all__ = [
    "MAX_ABS_MICROS",
    "MAX_AMOUNT_MICROS",
    "MICROS_PER_UNIT",
    "MoneyError",
    "format_amount",
    "from_micros",
    "from_wire",
    "to_wire",
    "minor_unit_digits",
    "minor_unit_micros",
    "round_half_up_to_minor",
    "to_micros",
]

MICROS_PER_UNIT = 1_000_000
_MICRO_DIGITS = 6
# Amounts are stored as signed 64-bit integers (and google.type.Money's units are int64).
MAX_ABS_MICROS = 2**63 - 1
# The largest amount a request may carry, and the largest balance an account may hold: one
# trillion units (10^18 micros), so that a balance plus an amount, or a sum of a month's lines,
# stays far below 2^63 (docs/security.md, "Hostile input").
MAX_AMOUNT_MICROS = 10**18
NANOS_PER_MICRO = 1000

# ISO 4217 currencies whose minor unit is not two decimals. Everything else has two, which is
# the default for codes not listed (the catalog accepts any three-letter code).
_MINOR_DIGITS = MappingProxyType(
    {
        # No minor unit in use.
        "BIF": 0,
        "CLP": 0,
        "DJF": 0,
        "GNF": 0,
        "ISK": 0,
        "JPY": 0,
        "KMF": 0,
        "KRW": 0,
        "PYG": 0,
        "RWF": 0,
        "UGX": 0,
        "UYI": 0,
        "VND": 0,
        "VUV": 0,
        "XAF": 0,
        "XOF": 0,
        "XPF": 0,
        # Thousandths.
        "BHD": 3,
        "IQD": 3,
        "JOD": 3,
        "KWD": 3,
        "LYD": 3,
        "OMR": 3,
        "TND": 3,
        # Units of account with four decimals.
        "CLF": 4,
        "UYW": 4,
    }
)
_DEFAULT_MINOR_DIGITS = 2


class MoneyError(ValueError):
    """An amount that cannot be represented exactly in micro-units."""


def to_micros(amount: Decimal | int) -> int:
    """Return ``amount`` (in units of a currency) as an exact number of micro-units.

    ``Decimal("0.0025")`` is 2,500 micros. More than six significant decimals
    (``Decimal("0.0000001")``), NaN, infinities and amounts beyond a signed 64-bit count of
    micros raise ``MoneyError``; trailing zeros do not count (``Decimal("1.50000000")`` is
    fine). Floats are refused with ``TypeError``: they are not exact to begin with.
    """
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"an amount must be a Decimal or an int, got {type(amount).__name__}")
    if isinstance(amount, int):
        micros = amount * MICROS_PER_UNIT
    else:
        if not amount.is_finite():
            raise MoneyError(f"amount {amount} is not a finite number")
        if amount.is_zero():
            return 0
        # Checked before any arithmetic, so an extreme exponent cannot make us build a huge int.
        if amount.adjusted() > 18:
            raise MoneyError(f"amount {amount} is out of range")
        if amount.adjusted() < -_MICRO_DIGITS:
            raise MoneyError(f"amount {amount} is smaller than one micro-unit")
        sign, digits, exponent = amount.as_tuple()
        assert isinstance(exponent, int)  # finite, checked above
        coefficient = int("".join(map(str, digits)))
        shift = exponent + _MICRO_DIGITS
        if shift >= 0:
            micros = coefficient * 10**shift
        else:
            micros, rest = divmod(coefficient, 10**-shift)
            if rest:
                raise MoneyError(
                    f"amount {amount} has more than {_MICRO_DIGITS} decimals;"
                    " it cannot be held exactly in micro-units"
                )
        if sign:
            micros = -micros
    if abs(micros) > MAX_ABS_MICROS:
        raise MoneyError(f"amount {amount} is out of range")
    return micros


def from_wire(units: int, nanos: int, field: str) -> int:
    """google.type.Money's ``units`` and ``nanos`` as exact micro-units, or INVALID_ARGUMENT
    naming ``field``: nanos outside +-999,999,999, units and nanos of different signs, finer
    than a micro-unit, or beyond +-MAX_AMOUNT_MICROS."""
    from shared.errors import InvalidArgument

    if not -999_999_999 <= nanos <= 999_999_999 or (units and nanos and (units > 0) != (nanos > 0)):
        raise InvalidArgument(field, f"{field} is not a valid google.type.Money")
    if nanos % NANOS_PER_MICRO:
        raise InvalidArgument(field, f"{field} has more than 6 decimals")
    micros = units * MICROS_PER_UNIT + nanos // NANOS_PER_MICRO  # exact: nanos % 1000 == 0
    if abs(micros) > MAX_AMOUNT_MICROS:
        raise InvalidArgument(
            field,
            f"{field} must be at most {MAX_AMOUNT_MICROS // MICROS_PER_UNIT} units either way",
        )
    return micros


def to_wire(micros: int) -> tuple[int, int]:
    """``micros`` as google.type.Money's (units, nanos), both of the sign of the amount."""
    _require_int(micros)
    whole, fraction = divmod(abs(micros), MICROS_PER_UNIT)
    sign = -1 if micros < 0 else 1
    return sign * whole, sign * fraction * NANOS_PER_MICRO


def from_micros(micros: int) -> Decimal:
    """Return ``micros`` as a Decimal in units, exactly, with six decimals (2500 → 0.002500)."""
    _require_int(micros)
    # Built from a string, so the context's precision cannot round it.
    return Decimal(f"{micros}E-{_MICRO_DIGITS}")


def minor_unit_digits(currency_code: str) -> int:
    """The number of decimals of ``currency_code``'s minor unit (ISO 4217 exponent).

    USD, EUR, CNY: 2; JPY, KRW: 0; BHD, KWD: 3; a code not in the table: 2.
    """
    return _MINOR_DIGITS.get(currency_code.upper(), _DEFAULT_MINOR_DIGITS)


def minor_unit_micros(currency_code: str) -> int:
    """The size of one minor unit in micros: 10,000 for a cent, 1,000,000 for a yen."""
    return 10 ** (_MICRO_DIGITS - minor_unit_digits(currency_code))


def round_half_up_to_minor(micros: int, currency_code: str) -> int:
    """Round ``micros`` to a whole number of the currency's minor units, half away from zero.

    Still in micros: 1,005,000 (1.005 USD) becomes 1,010,000; 1,004,999 becomes 1,000,000;
    -1,005,000 becomes -1,010,000 (the mirror image of the positive amount). A whole number of
    minor units is returned unchanged.
    """
    _require_int(micros)
    step = minor_unit_micros(currency_code)
    units, rest = divmod(abs(micros), step)
    if 2 * rest >= step:
        units += 1
    rounded = units * step
    return -rounded if micros < 0 else rounded


def format_amount(micros: int, currency_code: str) -> str:
    """Write ``micros`` as a plain decimal amount of ``currency_code``, exactly.

    At least the currency's minor digits, more only when the amount is finer than its minor
    unit: 1,500,000 USD is ``"1.50"``, 1,234,500 USD is ``"1.2345"``, 1,500,000,000 JPY is
    ``"1500"``, -10,000 USD is ``"-0.01"``. No symbol and no grouping separators, so the text
    reads back as the same Decimal in any locale.
    """
    _require_int(micros)
    whole, fraction = divmod(abs(micros), MICROS_PER_UNIT)
    decimals = f"{fraction:0{_MICRO_DIGITS}d}".rstrip("0")
    decimals = decimals.ljust(minor_unit_digits(currency_code), "0")
    sign = "-" if micros < 0 else ""
    return f"{sign}{whole}.{decimals}" if decimals else f"{sign}{whole}"


def _require_int(micros: int) -> None:
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise TypeError(f"micros must be an int, got {type(micros).__name__}")
