"""A rate limit of 5 calls a second, exact across two quota processes of one region.

Two `python -m services.quota` processes on one database (a SQLite file, and PostgreSQL) are
replicas of one regional deployment (docs/design/scale.md): they share nothing but the
database, where each limited CheckQuota takes its token by one atomic upsert
(docs/design/deduction-order.md, "Rate limits"). Both run the manual clock from the same
instant, so the 20 concurrent checks happen within one second of service time exactly, and no
refill can sneak in while they run.

The same arithmetic is then checked statement by statement: random sequences of calls through
the repository's upsert answer exactly as `domain/rate_limits.take` does.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc

from services.quota.adapters import rate_limits_repository as repo
from services.quota.domain.rate_limits import Limit, take
from shared.timeutil import to_epoch_us
from tests.support.quota import API, REGION, quota_env, quota_process
from tests.support.servers import Tokens

ACCOUNT = "acct-throttled"
LIMIT = 5
CALLS = 20
CALL_TIMEOUT = 30.0
START = "2024-01-01T00:00:00Z"
CATALOG = f"""\
currency: USD
regions:
  - {{id: {REGION}, name: CN-Hong Kong}}
apis:
  - id: {API}
    name: Passport OCR
    rate_limit_per_second: {LIMIT}
    price_tiers:
      - {{unit_price: "0.0025"}}
offers: []
"""

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


@pytest.fixture
async def replicas(database_url, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    extra = {"ALLOT_CATALOG": str(catalog), "ALLOT_CLOCK": "manual", "ALLOT_CLOCK_START": START}
    # One after the other: the first migrates an empty PostgreSQL database.
    with quota_process(quota_env(database_url, tmp_path, **extra), tmp_path / "a.log") as a:
        with quota_process(quota_env(database_url, tmp_path, **extra), tmp_path / "b.log") as b:
            async with (
                grpc.aio.insecure_channel(a.addr) as channel_a,
                grpc.aio.insecure_channel(b.addr) as channel_b,
            ):
                yield [
                    quota_service_pb2_grpc.QuotaServiceStub(channel_a),
                    quota_service_pb2_grpc.QuotaServiceStub(channel_b),
                ]


async def test_twenty_concurrent_checks_on_two_processes_admit_exactly_five(replicas):
    await replicas[0].EnableApi(
        quota_service_pb2.EnableApiRequest(account_id=ACCOUNT, region=REGION, api=API),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )
    request = quota_service_pb2.CheckQuotaRequest(account_id=ACCOUNT, region=REGION, api=API)
    responses = await asyncio.gather(
        *(
            replicas[n % 2].CheckQuota(request, metadata=GATEWAY, timeout=CALL_TIMEOUT)
            for n in range(CALLS)
        )
    )
    assert sum(r.allowed for r in responses) == LIMIT
    denied = [r for r in responses if not r.allowed]
    assert {r.deny_reason for r in denied} == {quota_service_pb2.DENY_REASON_RATE_LIMITED}
    assert {r.retry_after.ToTimedelta() for r in denied} == {timedelta(seconds=1) / LIMIT}


async def test_the_upsert_answers_as_the_reference_bucket(quota, seed):
    """A few hundred calls at random instants (some behind the bucket's time, as a replica's
    clock may be) against random limits: the database's statement and `take` agree."""
    db = quota.server.runtime.db  # the `quota` fixture's migrated database, either dialect
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for n in range(4):
        limit = Limit(rng.choice([1, 3, 7, 1000]), rng.choice([1, 2, 5, 50]))
        key = (f"acct-{n}", REGION, API)
        # A new bucket is full and was last refilled at its first call.
        tokens, refill_us = limit.capacity, None
        now = start
        for _ in range(60):
            now += timedelta(microseconds=rng.choice([0, 0, 1, 1_000, 150_000, 2_000_000]))
            at = now - timedelta(microseconds=rng.choice([0, 0, 0, 500]))

            async def work(uow, at=at, key=key, limit=limit):
                return await repo.take_token(uow, key, limit, at)

            got = await db.transaction(work)
            at_us = to_epoch_us(at)
            admitted, tokens, refill_us = take(tokens, refill_us or at_us, at_us, limit)
            assert got == (admitted, tokens), (limit, at)
