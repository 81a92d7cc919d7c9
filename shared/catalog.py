"""The catalog: regions, APIs with their pay-per-use price tiers, and the package offers for sale.

Services load it once at start from a YAML file (``ALLOT_CATALOG``, format in
``docs/design/billing.md``); a malformed file is rejected with a ``CatalogError`` that reads
``<file>:<line>: <problem>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from shared.errors import InvalidArgument

__all__ = [
    "Api",
    "Catalog",
    "CatalogError",
    "Offer",
    "PriceTier",
    "Region",
    "load_catalog",
    "parse_catalog",
]


@dataclass(frozen=True)
class Region:
    id: str
    name: str


@dataclass(frozen=True)
class PriceTier:
    """One step of a graduated price.

    ``up_to`` is the month's pay-per-use call count (inclusive) up to which ``unit_price``
    applies; ``None`` on the last tier means every call above the previous tier.
    """

    up_to: int | None
    unit_price: Decimal


@dataclass(frozen=True)
class Api:
    id: str
    name: str
    free_monthly_quantity: int
    price_tiers: tuple[PriceTier, ...]
    # Mappings are left out of the hash (they are unhashable) but still compared by ``==``,
    # so equal objects keep equal hashes.
    region_price_tiers: Mapping[str, tuple[PriceTier, ...]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    rate_limit_per_second: int | None = None  # quota's CheckQuota; None = no catalog limit

    def tiers_for(self, region: str) -> tuple[PriceTier, ...]:
        """The pay-per-use tiers in ``region``: its override if it has one, else the default."""
        return self.region_price_tiers.get(region, self.price_tiers)


@dataclass(frozen=True)
class Offer:
    """A package for sale; ``regions`` is resolved (omitted in the file = every region)."""

    id: str
    api: str
    regions: tuple[str, ...]
    quantity: int
    validity_months: int
    price: Decimal


@dataclass(frozen=True)
class Catalog:
    """Everything for sale; mappings are read-only and keep the file's order."""

    currency: str
    regions: Mapping[str, Region] = field(hash=False)
    apis: Mapping[str, Api] = field(hash=False)
    offers: Mapping[str, Offer] = field(hash=False)

    def has_region(self, region_id: str) -> bool:
        return region_id in self.regions

    def has_api(self, api_id: str) -> bool:
        return api_id in self.apis

    def check_region(self, region: str, field: str = "region", required: bool = True) -> str:
        """``region`` if the catalog knows it (or it is empty and not ``required``), else
        INVALID_ARGUMENT on ``field`` (UNKNOWN_REGION for a region the catalog lacks)."""
        return _known("region", region, self.regions, field, required)

    def check_api(self, api: str, field: str = "api", required: bool = True) -> str:
        """``api`` if the catalog knows it (or it is empty and not ``required``), else
        INVALID_ARGUMENT on ``field`` (UNKNOWN_API for an API the catalog lacks)."""
        return _known("api", api, self.apis, field, required)

    def offers_for(self, api: str = "", region: str = "") -> list[Offer]:
        """Offers of ``api`` sold in ``region``, in file order; an empty filter matches any."""
        return [
            offer
            for offer in self.offers.values()
            if (not api or offer.api == api) and (not region or region in offer.regions)
        ]


def _known(kind: str, value: str, known: Mapping[str, object], field: str, required: bool) -> str:
    """``value`` if it is an id of ``known`` (a catalog's regions or apis); see check_region."""
    if not value:
        if required:
            raise InvalidArgument(field, f"{field} is required")
        return value
    if value not in known:
        raise InvalidArgument(
            field,
            f"unknown {kind} {value!r}",
            reason=f"UNKNOWN_{kind.upper()}",
            **{kind: value},
        )
    return value


class CatalogError(Exception):
    """A catalog that cannot be used; ``str()`` is ``<source>:<line>: <problem>``.

    ``line`` is 1-based, or ``None`` when the file could not be read at all.
    """

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {problem}")


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    """Read and validate the catalog file at ``path``; errors name the path as given."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise CatalogError(source, line, "catalog is not valid UTF-8") from exc
    except OSError as exc:
        raise CatalogError(source, None, f"cannot read catalog: {exc.strerror or exc}") from exc
    return parse_catalog(text, source)


def parse_catalog(text: str, source: str = "<catalog>") -> Catalog:
    """Validate catalog YAML ``text``; ``source`` names it in error messages."""
    try:
        # Nodes rather than Python objects: they carry the line of every value, and they keep
        # the scalar's resolved tag, so an unquoted price can be told apart from a quoted one.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise CatalogError(
            source, mark.line + 1 if mark else 1, f"invalid YAML: {problem}"
        ) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise CatalogError(source, line, f"invalid YAML: {exc.reason}") from exc
    if root is None:
        raise CatalogError(source, 1, "catalog is empty")
    return _Parser(source).catalog(root)


_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
_CURRENCY = re.compile(r"[A-Z]{3}")
# Plain decimal notation only: no exponents, NaN or infinities in a price list.
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"

# Stateless for scalars; reused so integers are read exactly as YAML reads them (``1_000``).
_CONSTRUCTOR = SafeConstructor()

_Entry = TypeVar("_Entry", Region, Api, Offer)


def _show(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "nothing" if node.tag == "tag:yaml.org,2002:null" else f"'{node.value}'"


def _label(kind: str, node: Node, index: int) -> str:
    """``api 'passport'`` when the entry has a readable id, else ``api #3``."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if key.value == "id" and isinstance(value, ScalarNode) and value.tag == _STR:
                return f"{kind} '{value.value}'"
    return f"{kind} #{index}"


class _Parser:
    """Builds a ``Catalog`` from composed YAML nodes, stopping at the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Node, problem: str) -> CatalogError:
        return CatalogError(self.source, node.start_mark.line + 1, problem)

    # --- the catalog's parts, top down ---

    def catalog(self, root: Node) -> Catalog:
        top = self.fields(root, "catalog", ("currency", "regions", "apis"), ("offers",))
        currency = self.string(top["currency"], "currency")
        if not _CURRENCY.fullmatch(currency):
            raise self.error(
                top["currency"], f"currency '{currency}' must be a 3-letter ISO 4217 code like USD"
            )
        # Fixed order whatever the file's order: apis and offers refer to regions.
        regions = self.entries(top["regions"], "region", self.region)
        apis = self.entries(top["apis"], "api", lambda node, label: self.api(node, label, regions))
        offers: dict[str, Offer] = {}
        if "offers" in top:
            offers = self.entries(
                top["offers"],
                "offer",
                lambda node, label: self.offer(node, label, regions, apis),
                allow_empty=True,
            )
        return Catalog(
            currency=currency,
            regions=MappingProxyType(regions),
            apis=MappingProxyType(apis),
            offers=MappingProxyType(offers),
        )

    def entries(
        self,
        node: Node,
        kind: str,
        parse: Callable[[Node, str], _Entry],
        allow_empty: bool = False,
    ) -> dict[str, _Entry]:
        result: dict[str, _Entry] = {}
        for index, item in enumerate(self.sequence(node, f"{kind}s", allow_empty), 1):
            entry = parse(item, _label(kind, item, index))
            if entry.id in result:
                raise self.error(item, f"duplicate {kind} id '{entry.id}'")
            result[entry.id] = entry
        return result

    def region(self, node: Node, label: str) -> Region:
        fields = self.fields(node, label, ("id", "name"))
        return Region(
            id=self.ident(fields["id"], f"id of {label}"),
            name=self.string(fields["name"], f"name of {label}"),
        )

    def api(self, node: Node, label: str, regions: Mapping[str, Region]) -> Api:
        fields = self.fields(
            node,
            label,
            ("id", "name", "price_tiers"),
            ("free_monthly_quantity", "region_price_tiers", "rate_limit_per_second"),
        )
        api_id = self.ident(fields["id"], f"id of {label}")
        name = self.string(fields["name"], f"name of {label}")
        price_tiers = self.tiers(fields["price_tiers"], label)
        free = 0
        if "free_monthly_quantity" in fields:
            free = self.integer(
                fields["free_monthly_quantity"], f"free_monthly_quantity of {label}", minimum=0
            )
        rps = fields.get("rate_limit_per_second")
        overrides: dict[str, tuple[PriceTier, ...]] = {}
        if "region_price_tiers" in fields:
            by_region = self.fields(
                fields["region_price_tiers"],
                f"region_price_tiers of {label}",
                optional=tuple(regions),
                key_kind="region",
            )
            for region, tiers in by_region.items():
                overrides[region] = self.tiers(tiers, f"{label} in region '{region}'")
        return Api(
            id=api_id,
            name=name,
            free_monthly_quantity=free,
            price_tiers=price_tiers,
            region_price_tiers=MappingProxyType(overrides),
            rate_limit_per_second=rps and self.integer(rps, f"rate_limit_per_second of {label}", 1),
        )

    def tiers(self, node: Node, owner: str) -> tuple[PriceTier, ...]:
        items = self.sequence(node, f"price tiers of {owner}")
        tiers: list[PriceTier] = []
        for index, item in enumerate(items, 1):
            label = f"price tier {index} of {owner}"
            fields = self.fields(item, label, ("unit_price",), ("up_to",))
            unit_price = self.decimal(fields["unit_price"], f"unit_price of {label}")
            is_last = index == len(items)
            up_to = None
            if "up_to" in fields:
                if is_last:
                    raise self.error(
                        fields["up_to"],
                        f"the last price tier of {owner} must have no up_to:"
                        " it prices every call above the previous tier",
                    )
                up_to = self.integer(fields["up_to"], f"up_to of {label}", minimum=1)
                previous = tiers[-1].up_to if tiers else None
                if previous is not None and up_to <= previous:
                    raise self.error(
                        fields["up_to"],
                        f"up_to of {label} must be greater than the previous tier's"
                        f" ({up_to} <= {previous})",
                    )
            elif not is_last:
                raise self.error(
                    item, f"{label} has no up_to; only the last tier may be open-ended"
                )
            tiers.append(PriceTier(up_to=up_to, unit_price=unit_price))
        return tuple(tiers)

    def offer(
        self, node: Node, label: str, regions: Mapping[str, Region], apis: Mapping[str, Api]
    ) -> Offer:
        fields = self.fields(
            node, label, ("id", "api", "quantity", "validity_months", "price"), ("regions",)
        )
        offer_id = self.ident(fields["id"], f"id of {label}")
        api = self.string(fields["api"], f"api of {label}")
        if api not in apis:
            raise self.error(fields["api"], f"{label} names unknown api '{api}'")
        offer_regions: list[str] = []
        if "regions" in fields:
            for item in self.sequence(fields["regions"], f"regions of {label}"):
                region = self.string(item, f"region of {label}")
                if region not in regions:
                    raise self.error(item, f"{label} names unknown region '{region}'")
                if region in offer_regions:
                    raise self.error(item, f"{label} lists region '{region}' twice")
                offer_regions.append(region)
        else:
            offer_regions = list(regions)
        return Offer(
            id=offer_id,
            api=api,
            regions=tuple(offer_regions),
            quantity=self.integer(fields["quantity"], f"quantity of {label}", minimum=1),
            validity_months=self.integer(
                fields["validity_months"], f"validity_months of {label}", minimum=1
            ),
            price=self.decimal(fields["price"], f"price of {label}"),
        )

    # --- YAML shapes and scalars ---

    def fields(
        self,
        node: Node,
        what: str,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        key_kind: str = "key",
    ) -> dict[str, Node]:
        """The mapping's values by key; every key must be allowed and every required one present."""
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{what} must be a mapping, not {_show(node)}")
        allowed = (*required, *optional)
        result: dict[str, Node] = {}
        for key, value in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                raise self.error(key, f"{what} has a {key_kind} that is not a string: {_show(key)}")
            if key.value in result:
                raise self.error(key, f"{what} has duplicate {key_kind} '{key.value}'")
            if key.value not in allowed:
                expected = ", ".join(allowed) or "none"
                raise self.error(
                    key, f"{what} has unknown {key_kind} '{key.value}' (expected: {expected})"
                )
            result[key.value] = value
        for name in required:
            if name not in result:
                raise self.error(node, f"{what} is missing '{name}'")
        return result

    def sequence(self, node: Node, what: str, allow_empty: bool = False) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"{what} must be a list, not {_show(node)}")
        if not node.value and not allow_empty:
            raise self.error(node, f"{what} must not be empty")
        return list(node.value)

    def string(self, node: Node, what: str) -> str:
        if not (isinstance(node, ScalarNode) and node.tag == _STR and node.value.strip()):
            raise self.error(node, f"{what} must be a non-empty string, not {_show(node)}")
        return node.value

    def ident(self, node: Node, what: str) -> str:
        value = self.string(node, what)
        if not _ID.fullmatch(value):
            raise self.error(
                node,
                f"{what} must be lower-case letters, digits and '-', starting with a letter"
                f" or digit, not '{value}'",
            )
        return value

    def integer(self, node: Node, what: str, minimum: int) -> int:
        # The int tag excludes booleans, which Python would otherwise accept as 0 and 1.
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            raise self.error(node, f"{what} must be a whole number, not {_show(node)}")
        value: int = _CONSTRUCTOR.construct_yaml_int(node)
        if value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise self.error(node, f"{what} must be {bound}, not {value}")
        return value

    def decimal(self, node: Node, what: str) -> Decimal:
        if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
            # An unquoted 0.1 is a binary float in YAML; prices must stay exact.
            raise self.error(
                node,
                f'{what} must be a quoted decimal string: write "{node.value}",'
                f" not {node.value}, so it is read exactly rather than as a YAML number",
            )
        if not (
            isinstance(node, ScalarNode) and node.tag == _STR and _DECIMAL.fullmatch(node.value)
        ):
            raise self.error(
                node, f'{what} must be a decimal string like "0.0025", not {_show(node)}'
            )
        value = Decimal(node.value)
        if value < 0:
            raise self.error(node, f"{what} must not be negative ({value})")
        return value
