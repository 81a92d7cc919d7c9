"""The token bucket's arithmetic (services/quota/domain/rate_limits.py), which the database's
one-statement upsert repeats (docs/design/deduction-order.md, "Rate limits")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.quota.domain.rate_limits import (
    MAX_BURST,
    MAX_PER_SECOND,
    TOKEN,
    Limit,
    Override,
    Source,
    effective,
    override_limit,
    retry_after,
    take,
)
from shared.errors import InvalidArgument

SECOND = 1_000_000  # microseconds


def test_a_full_bucket_admits_its_burst_then_one_call_per_refill() -> None:
    limit = Limit(per_second=5, burst=5)
    tokens, at = limit.capacity, 0
    answers = []
    for _ in range(7):
        admitted, tokens, at = take(tokens, at, 0, limit)
        answers.append(admitted)
    assert answers == [True] * 5 + [False] * 2
    assert retry_after(tokens, limit) == timedelta(milliseconds=200)
    assert take(tokens, at, 199_999, limit)[0] is False
    assert take(tokens, at, 200_000, limit)[:2] == (True, 0)


def test_refill_is_capped_at_the_burst_and_never_overflows() -> None:
    limit = Limit(per_second=MAX_PER_SECOND, burst=MAX_BURST)
    admitted, tokens, at = take(0, 0, 100 * 365 * 86_400 * SECOND, limit)
    assert admitted and tokens == limit.capacity - TOKEN
    assert limit.fill_us * limit.per_second < 2**63


def test_a_clock_behind_the_bucket_refills_nothing() -> None:
    limit = Limit(per_second=1, burst=1)
    admitted, tokens, at = take(0, 5 * SECOND, 4 * SECOND, limit)
    assert (admitted, tokens, at) == (False, 0, 5 * SECOND)


def test_retry_after_rounds_up_to_whole_microseconds() -> None:
    limit = Limit(per_second=3, burst=3)
    assert retry_after(0, limit) == timedelta(microseconds=333_334)
    assert retry_after(TOKEN, limit) == timedelta(0)


def test_the_override_beats_the_catalog() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    override = Override("a", "r", "api", Limit(2, 3), at)
    assert effective("a", "r", "api", 5, override).limit == Limit(2, 3)
    assert effective("a", "r", "api", 5, override).source == Source.OVERRIDE
    assert effective("a", "r", "api", 5, None).limit == Limit(5, 5)
    assert effective("a", "r", "api", None, None).source == Source.NONE
    assert effective("a", "r", "api", None, None).limit is None


@pytest.mark.parametrize(
    ("per_second", "burst", "field"),
    [
        (-1, 0, "per_second"),
        (MAX_PER_SECOND + 1, 0, "per_second"),
        (0, 1, "burst"),
        (1, -1, "burst"),
        (1, MAX_BURST + 1, "burst"),
    ],
)
def test_override_limits_are_bounded(per_second: int, burst: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        override_limit(per_second, burst)
    assert caught.value.metadata["field"] == field


def test_override_zero_clears_and_zero_burst_means_per_second() -> None:
    assert override_limit(0, 0) is None
    assert override_limit(4, 0) == Limit(4, 4)
    assert override_limit(4, 9) == Limit(4, 9)
