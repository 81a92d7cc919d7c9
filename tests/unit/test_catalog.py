"""Catalog loading: the shipped sample, lookups, and errors that name file, line and problem."""

from dataclasses import FrozenInstanceError
from decimal import Decimal
from pathlib import Path

import pytest

from shared.catalog import (
    Api,
    CatalogError,
    PriceTier,
    load_catalog,
    parse_catalog,
)

SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "catalog.yaml"

SAMPLE_REGIONS = ["ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "la-south-2", "la-north-2"]
SAMPLE_APIS = ["general-text", "passport", "id-card", "table", "web-image"]
OFFER_SIZES = {
    "1k": 1_000,
    "10k": 10_000,
    "100k": 100_000,
    "500k": 500_000,
    "1m": 1_000_000,
    "5m": 5_000_000,
    "10m": 10_000_000,
}

# Line numbers below refer to this text; each bad case edits one spot of it.
VALID = """\
currency: USD
regions:
  - {id: r1, name: Region One}
  - {id: r2, name: Region Two}
apis:
  - id: ocr
    name: OCR
    price_tiers:
      - {up_to: 1000, unit_price: "0.0025"}
      - {unit_price: "0.0020"}
offers:
  - {id: ocr-1k, api: ocr, quantity: 1000, validity_months: 12, price: "2.00"}
"""


def test_sample_catalog_has_every_region_api_and_offer() -> None:
    catalog = load_catalog(SAMPLE)

    assert catalog.currency == "USD"
    assert list(catalog.regions) == SAMPLE_REGIONS
    assert catalog.regions["ap-southeast-1"].name == "CN-Hong Kong"
    assert catalog.regions["la-north-2"].name == "LA-Mexico City2"
    assert list(catalog.apis) == SAMPLE_APIS
    assert catalog.apis["passport"].name == "Passport OCR"
    assert catalog.apis["general-text"].free_monthly_quantity == 1000
    for api in SAMPLE_APIS:
        offers = catalog.offers_for(api=api)
        assert {offer.id: offer.quantity for offer in offers} == {
            f"{api}-{size}-1y": quantity for size, quantity in OFFER_SIZES.items()
        }
        assert all(offer.validity_months == 12 for offer in offers)
        assert all(offer.regions == tuple(SAMPLE_REGIONS) for offer in offers)


def test_sample_prices_fall_with_volume() -> None:
    catalog = load_catalog(SAMPLE)

    for api in catalog.apis.values():
        per_call = [o.price / o.quantity for o in catalog.offers_for(api=api.id)]
        assert per_call == sorted(per_call, reverse=True)
        for region in catalog.regions:
            prices = [tier.unit_price for tier in api.tiers_for(region)]
            assert 2 <= len(prices) <= 3
            assert prices == sorted(prices, reverse=True)


def test_parsed_values_are_exact_and_resolved() -> None:
    catalog = parse_catalog(VALID)

    api = catalog.apis["ocr"]
    assert api.free_monthly_quantity == 0
    assert api.price_tiers == (
        PriceTier(up_to=1000, unit_price=Decimal("0.0025")),
        PriceTier(up_to=None, unit_price=Decimal("0.0020")),
    )
    offer = catalog.offers["ocr-1k"]
    assert offer.price == Decimal("2.00")
    assert offer.regions == ("r1", "r2")
    assert catalog.has_region("r1") and not catalog.has_region("r3")
    assert catalog.has_api("ocr") and not catalog.has_api("OCR")


def test_tiers_for_uses_the_region_override_else_the_default() -> None:
    text = VALID.replace(
        '      - {unit_price: "0.0020"}\n',
        '      - {unit_price: "0.0020"}\n'
        "    region_price_tiers:\n"
        '      r2: [{unit_price: "0.0030"}]\n',
    )
    api = parse_catalog(text).apis["ocr"]

    assert api.tiers_for("r2") == (PriceTier(up_to=None, unit_price=Decimal("0.0030")),)
    assert api.tiers_for("r1") == api.price_tiers
    assert api.tiers_for("unknown") == api.price_tiers


def test_offers_for_filters_by_api_and_region() -> None:
    text = VALID + (
        '  - {id: ocr-r2, api: ocr, regions: [r2], quantity: 5, validity_months: 1, price: "1"}\n'
    )
    catalog = parse_catalog(text)

    def ids(**filters: str) -> list[str]:
        return [offer.id for offer in catalog.offers_for(**filters)]

    assert ids() == ["ocr-1k", "ocr-r2"]
    assert ids(api="ocr") == ["ocr-1k", "ocr-r2"]
    assert ids(region="r1") == ["ocr-1k"]
    assert ids(api="ocr", region="r2") == ["ocr-1k", "ocr-r2"]
    assert ids(api="other") == []
    assert ids(region="r9") == []


def test_catalog_is_immutable() -> None:
    catalog = parse_catalog(VALID)

    with pytest.raises(FrozenInstanceError):
        catalog.currency = "EUR"  # type: ignore[misc]
    with pytest.raises(TypeError):
        catalog.offers["x"] = catalog.offers["ocr-1k"]  # type: ignore[index]
    with pytest.raises(TypeError):
        catalog.apis["ocr"].region_price_tiers["r1"] = ()  # type: ignore[index]
    assert hash(catalog.apis["ocr"]) == hash(catalog.apis["ocr"])


def test_api_built_in_code_has_no_region_overrides() -> None:
    tiers = (PriceTier(up_to=None, unit_price=Decimal("1")),)
    api = Api(id="a", name="A", free_monthly_quantity=0, price_tiers=tiers)

    assert api.tiers_for("anywhere") == tiers


def test_rate_limit_per_second_is_optional() -> None:
    assert parse_catalog(VALID).apis["ocr"].rate_limit_per_second is None
    limited = parse_catalog(
        _edit("    name: OCR\n", "    name: OCR\n    rate_limit_per_second: 5\n")
    )
    assert limited.apis["ocr"].rate_limit_per_second == 5


def _edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


REGIONS = "  - {id: r1, name: Region One}\n  - {id: r2, name: Region Two}\n"
TIER_1 = '      - {up_to: 1000, unit_price: "0.0025"}\n'
TIER_2 = '      - {unit_price: "0.0020"}\n'
OFFER = '  - {id: ocr-1k, api: ocr, quantity: 1000, validity_months: 12, price: "2.00"}\n'

BAD_CATALOGS = [
    pytest.param(_edit("name: OCR", "name: OCR: x"), 7, "invalid YAML", id="bad-yaml"),
    pytest.param(_edit("{id: r2, name: Region Two}", "{id: r2"), 5, "invalid YAML", id="bad-flow"),
    pytest.param(_edit('price: "2.00"', "price: 2.00"), 12, "quoted decimal", id="float-price"),
    pytest.param(_edit('price: "2.00"', "price: 2"), 12, "quoted decimal", id="int-price"),
    pytest.param(_edit('"0.0025"', "0.0025"), 9, "quoted decimal", id="float-unit-price"),
    pytest.param(_edit('price: "2.00"', 'price: "-1"'), 12, "must not be negative", id="neg-price"),
    pytest.param(_edit('price: "2.00"', 'price: "1e3"'), 12, "decimal string", id="exp-price"),
    pytest.param(
        _edit("api: ocr,", "api: nope,"),
        12,
        "offer 'ocr-1k' names unknown api 'nope'",
        id="unknown-api",
    ),
    pytest.param(
        _edit("api: ocr,", "api: ocr, regions: [r1, r9],"),
        12,
        "offer 'ocr-1k' names unknown region 'r9'",
        id="unknown-region",
    ),
    pytest.param(_edit("api: ocr,", "api: ocr, regions: [],"), 12, "empty", id="no-regions"),
    pytest.param(_edit("{id: r2,", "{id: r1,"), 4, "duplicate region id 'r1'", id="dup-region"),
    pytest.param(VALID + OFFER, 13, "duplicate offer id 'ocr-1k'", id="dup-offer"),
    pytest.param(
        _edit(TIER_2, '      - {up_to: 500, unit_price: "0.0022"}\n' + TIER_2),
        10,
        "must be greater than the previous tier's (500 <= 1000)",
        id="tiers-out-of-order",
    ),
    pytest.param(
        _edit(TIER_2, '      - {up_to: 2000, unit_price: "0.0020"}\n'),
        10,
        "the last price tier of api 'ocr' must have no up_to",
        id="no-open-last-tier",
    ),
    pytest.param(
        _edit('{up_to: 1000, unit_price: "0.0025"}', '{unit_price: "0.0025"}'),
        9,
        "only the last tier may be open-ended",
        id="open-middle-tier",
    ),
    pytest.param(
        _edit("price_tiers:\n" + TIER_1 + TIER_2, "price_tiers: []\n"),
        8,
        "price tiers of api 'ocr' must not be empty",
        id="no-tiers",
    ),
    pytest.param(
        _edit("name: OCR\n", "name: OCR\n    colour: red\n"),
        8,
        "api 'ocr' has unknown key 'colour'",
        id="unknown-key",
    ),
    pytest.param("version: 2\n" + VALID, 1, "unknown key 'version'", id="unknown-top-key"),
    pytest.param(
        _edit("name: OCR\n", "name: OCR\n    name: X\n"), 8, "duplicate key", id="dup-key"
    ),
    pytest.param(_edit("    name: OCR\n", ""), 6, "api 'ocr' is missing 'name'", id="missing-key"),
    pytest.param(
        _edit("quantity: 1000", "quantity: -5"), 12, "must be positive", id="neg-quantity"
    ),
    pytest.param(_edit("quantity: 1000", "quantity: true"), 12, "whole number", id="bool-quantity"),
    pytest.param(
        _edit("validity_months: 12", "validity_months: 0"), 12, "must be positive", id="zero-months"
    ),
    pytest.param(
        _edit("    name: OCR\n", "    name: OCR\n    free_monthly_quantity: -1\n"),
        8,
        "free_monthly_quantity of api 'ocr' must be at least 0",
        id="neg-free",
    ),
    pytest.param(
        _edit("    name: OCR\n", "    name: OCR\n    rate_limit_per_second: 0\n"),
        8,
        "rate_limit_per_second of api 'ocr' must be positive",
        id="zero-rate-limit",
    ),
    pytest.param(
        _edit("    name: OCR\n", "    name: OCR\n    rate_limit_per_second: 2.5\n"),
        8,
        "rate_limit_per_second of api 'ocr' must be a whole number",
        id="fractional-rate-limit",
    ),
    pytest.param(_edit("USD", "usd"), 1, "3-letter ISO 4217", id="bad-currency"),
    pytest.param(_edit("id: ocr\n", "id: OCR\n"), 6, "lower-case", id="bad-id"),
    pytest.param(
        _edit("regions:\n" + REGIONS, "regions: []\n"),
        2,
        "regions must not be empty",
        id="no-regions-list",
    ),
    pytest.param(
        _edit(TIER_2, TIER_2 + '    region_price_tiers: {r9: [{unit_price: "1"}]}\n'),
        11,
        "unknown region 'r9'",
        id="override-unknown-region",
    ),
    pytest.param(_edit("name: OCR", "name: \x07"), 7, "invalid YAML", id="control-char"),
    pytest.param(VALID + "---\ncurrency: EUR\n", 13, "single document", id="two-documents"),
    pytest.param("", 1, "catalog is empty", id="empty"),
    pytest.param("- just\n- a list\n", 1, "catalog must be a mapping", id="not-a-mapping"),
]


@pytest.mark.parametrize(("text", "line", "phrase"), BAD_CATALOGS)
def test_malformed_catalog_names_file_line_and_problem(
    tmp_path: Path, text: str, line: int, phrase: str
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(CatalogError) as caught:
        load_catalog(str(path))

    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert phrase in str(caught.value)


def test_parse_error_names_the_given_source() -> None:
    with pytest.raises(CatalogError, match=r"^deploy/catalog\.yaml:12: offer 'ocr-1k' names"):
        parse_catalog(_edit("api: ocr,", "api: y,"), source="deploy/catalog.yaml")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"

    with pytest.raises(CatalogError) as caught:
        load_catalog(path)

    assert caught.value.line is None
    assert str(caught.value).startswith(f"{path}: cannot read catalog")


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_bytes(b"currency: USD\nregions: \xff\n")

    with pytest.raises(CatalogError, match=r":2: catalog is not valid UTF-8$"):
        load_catalog(path)
