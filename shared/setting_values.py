"""The kinds of value a setting holds: how each is parsed from its environment variable (a
ValueError saying what was expected; `shared.settings` names the variable) and how
`allot settings` shows it (the token secret and passwords in URLs masked)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator


def whole_number(minimum: int):
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and value.isascii() and value.isdigit():
            number = int(value)
        else:
            raise ValueError("expected a whole number")
        if number < minimum:
            raise ValueError(f"expected a whole number of at least {minimum}")
        return number

    return parse


def duration(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"([0-9]{1,9})([smhd])", value.strip())
        if match and int(match[1]) > 0:
            return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    raise ValueError("expected a number and a unit (90s, 30m, 24h, 30d)")


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError("expected `true` or `false`")


def _one_of(*choices: str):
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected " + " or ".join(f"`{c}`" for c in choices))
        return value

    return parse


def _regions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(r.strip() for r in value if r.strip())


def _endpoints(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        return dict(value)
    endpoints = {}
    for item in filter(None, (p.strip() for p in str(value).split(","))):
        region, sep, addr = item.partition("=")
        if not sep or not region.strip() or not addr.strip():
            raise ValueError(f"expected region=host:port pairs ({item!r} is not one)")
        endpoints[region.strip()] = addr.strip()
    return endpoints


def _time_zone(value: Any) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError("expected a known time zone (IANA name such as Asia/Shanghai)") from None
    return value


def _instant(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        parsed = value
    elif value == "":
        return None
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("expected an RFC 3339 instant") from None
    if parsed is not None and parsed.tzinfo is None:
        raise ValueError("expected an RFC 3339 instant with a UTC offset")
    return parsed


def _log_level(value: Any) -> str:
    level = str(value).strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("expected a logging level (DEBUG, INFO, WARNING, ERROR)")
    return level


Address = Annotated[str, BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)]
WholeNumber = Annotated[int, BeforeValidator(whole_number(0))]
Positive = Annotated[int, BeforeValidator(whole_number(1))]
Seconds = Annotated[int, BeforeValidator(duration)]
Switch = Annotated[bool, BeforeValidator(_switch)]
Regions = Annotated[tuple[str, ...], BeforeValidator(_regions)]
Endpoints = Annotated[dict[str, str], BeforeValidator(_endpoints)]
TimeZoneName = Annotated[str, BeforeValidator(_time_zone)]
Instant = Annotated[datetime | None, BeforeValidator(_instant)]
LogLevel = Annotated[str, BeforeValidator(_log_level)]
DeductionPolicy = Annotated[
    Literal["standard", "expiring_first"], BeforeValidator(_one_of("standard", "expiring_first"))
]
ClockKind = Annotated[Literal["system", "manual"], BeforeValidator(_one_of("system", "manual"))]
ClientAuth = Annotated[Literal["none", "require"], BeforeValidator(_one_of("none", "require"))]
EventLoop = Annotated[Literal["auto", "asyncio"], BeforeValidator(_one_of("auto", "asyncio"))]
LogFormat = Annotated[Literal["text", "json"], BeforeValidator(_one_of("text", "json"))]


def shown(value: Any, secret: bool = False, url: bool = False) -> str:
    """A setting's value as `allot settings` prints it: the secret and URL passwords masked."""
    if value is None or value == "" or value == () or value == {}:
        return ""
    if secret:
        return "********"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    text = str(value)
    if url:
        return _without_password(text)
    return text


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "********"
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:********@{host}"))
