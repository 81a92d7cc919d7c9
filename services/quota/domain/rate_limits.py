"""Rate limits of admission: which limit applies, and the token bucket's arithmetic.

A limit is per account × region × API: the catalog's `rate_limit_per_second` of the API
(burst = per second), beaten by the account's override (`SetRateLimit`). The bucket holds up to
`burst` calls and refills at `per_second` calls a second; each admitted `CheckQuota` takes one.
Tokens are counted in micro-tokens (one call = `TOKEN`) and time in microseconds, so refill is
exact integer arithmetic: `elapsed_us * per_second` micro-tokens. The database runs the same
arithmetic in one statement (`adapters/rate_limits_repository.py`); `take` is its reference,
used by the tests (docs/design/deduction-order.md, "Rate limits").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.errors import InvalidArgument

TOKEN = 1_000_000  # micro-tokens of one call
# Bounds of a limit (the catalog's too: quota refuses to start on a larger one). With them a
# bucket holds at most 10^15 micro-tokens and a refill adds at most that plus 10^6: exact BIGINT.
MAX_PER_SECOND = 1_000_000
MAX_BURST = 1_000_000_000


class Source(enum.IntEnum):
    NONE = 1
    CATALOG = 2
    OVERRIDE = 3


@dataclass(frozen=True)
class Limit:
    per_second: int
    burst: int

    @property
    def capacity(self) -> int:
        """The bucket's size in micro-tokens."""
        return self.burst * TOKEN

    @property
    def fill_us(self) -> int:
        """Microseconds in which an empty bucket fills up: refill beyond it is capped, which
        also keeps `elapsed * per_second` far inside 64 bits after a long quiet spell."""
        return -(-self.capacity // self.per_second)


@dataclass(frozen=True)
class Override:
    account_id: str
    region: str
    api: str
    limit: Limit
    update_time: datetime


@dataclass(frozen=True)
class EffectiveLimit:
    """The limit `CheckQuota` applies (None: no limit) and where it comes from."""

    account_id: str
    region: str
    api: str
    limit: Limit | None
    source: Source
    update_time: datetime | None = None


def effective(
    account_id: str, region: str, api: str, catalog: int | None, override: Override | None
) -> EffectiveLimit:
    """The override beats the catalog; the catalog's limit has burst = per second."""
    if override is not None:
        return EffectiveLimit(
            account_id, region, api, override.limit, Source.OVERRIDE, override.update_time
        )
    if catalog:
        return EffectiveLimit(account_id, region, api, Limit(catalog, catalog), Source.CATALOG)
    return EffectiveLimit(account_id, region, api, None, Source.NONE)


def override_limit(per_second: int, burst: int) -> Limit | None:
    """The limit SetRateLimit sets (None: clear the override), or INVALID_ARGUMENT."""
    if not 0 <= per_second <= MAX_PER_SECOND:
        raise InvalidArgument(
            "per_second", f"per_second must be 0 (clear) to {MAX_PER_SECOND}, not {per_second}"
        )
    if not 0 <= burst <= MAX_BURST:
        raise InvalidArgument("burst", f"burst must be 0 (= per_second) to {MAX_BURST}")
    if per_second == 0:
        if burst:
            raise InvalidArgument("burst", "burst must be 0 when per_second is 0 (clear)")
        return None
    return Limit(per_second, burst or per_second)


def take(tokens: int, refill_us: int, now_us: int, limit: Limit) -> tuple[bool, int, int]:
    """One call against a bucket holding `tokens` micro-tokens last refilled at `refill_us`:
    (admitted, tokens after, refill time after). Time never runs backwards for a bucket
    (replicas' clocks may differ a little): an earlier `now_us` refills nothing."""
    elapsed = min(max(now_us - refill_us, 0), limit.fill_us)
    refilled = min(tokens + elapsed * limit.per_second, limit.capacity)
    admitted = refilled >= TOKEN
    return admitted, refilled - TOKEN if admitted else refilled, max(now_us, refill_us)


def retry_after(tokens: int, limit: Limit) -> timedelta:
    """How long until a bucket holding `tokens` micro-tokens has one call (whole microseconds,
    rounded up: a retry at that instant is admitted unless others took the token first)."""
    missing = max(TOKEN - tokens, 0)
    return timedelta(microseconds=-(-missing // limit.per_second))
