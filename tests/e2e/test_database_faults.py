"""Quota's database connections dropped under load: every call answers OK or a code the caller
can retry, a retry with the same event ids completes what failed, and nothing is counted twice.

PostgreSQL only (SQLite has no connections to drop). The test terminates every backend of
quota's database once a second (`pg_terminate_backend`, what a failover or an administrator
does) while gateways report usage one by one and in batches. A dropped connection is retried
on a fresh one inside the service, then answered UNAVAILABLE (docs/faults.md "Database
faults"); never INTERNAL or UNKNOWN. The gateway retries what failed with the same event ids:
afterwards the package's used quantity is exactly the sum of the events, and every event, sent
once more, is a duplicate. The process serves throughout, without a restart.
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import text

from shared.db import Database
from shared.errors import Unavailable
from shared.settings import DatabaseBounds
from tests.support.databases import (
    POSTGRES_ADMIN_URL,
    create_postgres_database,
    drop_postgres_database,
)
from tests.support.processes import quota_env, quota_process
from tests.support.quota_calls import QuotaCalls
from tests.support.servers import Tokens

ACCOUNT = "acct-db-faults"
REGION = "ap-southeast-1"
API = "passport"
PACKAGE_SIZE = 10_000_000  # never exhausted: used quantity counts every recorded unit
LOAD_SECONDS = 10.0
KILL_EVERY = 1.0
SINGLE_TASKS = 3
BATCH_TASKS = 1
BATCH_SIZE = 10
CALL_TIMEOUT = 10.0
RETRY_WITHIN = 30.0
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


@pytest.fixture
async def postgres_url():
    url = await create_postgres_database()  # skips when PostgreSQL is unreachable (not on CI)
    try:
        yield url
    finally:
        await drop_postgres_database(url)


def usage(event_id: str, quantity: int) -> quota_service_pb2.ReportUsageRequest:
    return QuotaCalls.usage(event_id, ACCOUNT, quantity, region=REGION, api=API)


def quantity_of(event_id: str) -> int:
    return 1 + zlib.crc32(event_id.encode()) % 3


@dataclass
class Load:
    acknowledged: dict[str, int] = field(default_factory=dict)  # event id -> units deducted
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    calls: int = 0

    def answered(self, event_id: str, response: quota_service_pb2.ReportUsageResponse) -> None:
        assert not response.HasField("error"), response
        self.acknowledged[event_id] = sum(d.quantity for d in response.deductions)
        self.failed.pop(event_id, None)


async def single_gateway(stub, task: int, load: Load, until: float) -> None:
    i = 0
    while time.monotonic() < until:
        event_id = f"s{task}-{i:05d}"
        i += 1
        load.calls += 1
        try:
            response = await stub.ReportUsage(
                usage(event_id, quantity_of(event_id)), metadata=GATEWAY, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            load.failed[event_id] = error.code()
            continue
        load.answered(event_id, response)


async def batch_gateway(stub, task: int, load: Load, until: float) -> None:
    i = 0
    while time.monotonic() < until:
        ids = [f"b{task}-{i:05d}-{k:02d}" for k in range(BATCH_SIZE)]
        i += 1
        load.calls += 1
        request = quota_service_pb2.BatchReportUsageRequest(
            requests=[usage(e, quantity_of(e)) for e in ids]
        )
        try:
            response = await stub.BatchReportUsage(request, metadata=GATEWAY, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            for event_id in ids:
                load.failed[event_id] = error.code()
            continue
        for event_id, item in zip(ids, response.responses, strict=True):
            load.answered(event_id, item)


async def killer(database: str, until: float) -> int:
    """Terminates every backend of `database` once a second; how many it terminated."""
    killed = 0
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        while time.monotonic() < until:
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            killed += sum(1 for row in rows if row[0])
            await asyncio.sleep(KILL_EVERY)
    finally:
        await admin.close()
    return killed


async def test_dropped_connections_answer_retryable_and_lose_or_double_nothing(
    postgres_url, tmp_path
):
    database = postgres_url.rsplit("/", 1)[1]
    with quota_process(quota_env(postgres_url, tmp_path), tmp_path / "quota.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
            package = await stub.GrantPackage(
                quota_service_pb2.GrantPackageRequest(
                    request_id="grant-db-faults",
                    package=quota_pb2.Package(
                        account_id=ACCOUNT,
                        region=REGION,
                        api=API,
                        source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                        total_quantity=PACKAGE_SIZE,
                        expire_time={"seconds": 4102444799},  # 2099-12-31T23:59:59Z
                    ),
                ),
                metadata=ADMIN,
                timeout=CALL_TIMEOUT,
            )

            load = Load()
            until = time.monotonic() + LOAD_SECONDS
            killed, *_ = await asyncio.gather(
                killer(database, until),
                *(single_gateway(stub, t, load, until) for t in range(SINGLE_TASKS)),
                *(batch_gateway(stub, t, load, until) for t in range(BATCH_TASKS)),
            )
            assert killed > 0, "no connection was terminated"
            codes = set(load.failed.values())
            assert codes <= RETRYABLE, (codes, process.log_text()[-4000:])
            assert process.proc is not None and process.proc.poll() is None, "quota died"
            print(
                f"\n{load.calls} calls, {len(load.acknowledged)} events acknowledged, "
                f"{len(load.failed)} failed ({sorted(c.name for c in codes)}), "
                f"{killed} backends terminated"
            )

            # The gateway retries what failed, with the same ids, until it is acknowledged.
            deadline = time.monotonic() + RETRY_WITHIN
            while load.failed:
                assert time.monotonic() < deadline, f"still failing: {load.failed}"
                for event_id in sorted(load.failed):
                    try:
                        response = await stub.ReportUsage(
                            usage(event_id, quantity_of(event_id)),
                            metadata=GATEWAY,
                            timeout=CALL_TIMEOUT,
                        )
                    except grpc.aio.AioRpcError as error:
                        assert error.code() in RETRYABLE, error
                        await asyncio.sleep(0.2)
                        continue
                    load.answered(event_id, response)

            # Every event counted once: what was acknowledged is what was used, each event once.
            expected = sum(quantity_of(e) for e in load.acknowledged)
            assert sum(load.acknowledged.values()) == expected
            used = (
                await stub.GetPackage(
                    quota_service_pb2.GetPackageRequest(package_id=package.package_id),
                    metadata=ADMIN,
                    timeout=CALL_TIMEOUT,
                )
            ).used_quantity
            assert used == expected
            events = sorted(load.acknowledged)
            for start in range(0, len(events), 500):
                chunk = events[start : start + 500]
                again = await stub.BatchReportUsage(
                    quota_service_pb2.BatchReportUsageRequest(
                        requests=[usage(e, quantity_of(e)) for e in chunk]
                    ),
                    metadata=GATEWAY,
                    timeout=CALL_TIMEOUT,
                )
                assert all(r.duplicate for r in again.responses)
            summary = await stub.GetQuotaSummary(
                quota_service_pb2.GetQuotaSummaryRequest(account_id=ACCOUNT),
                metadata=ADMIN,
                timeout=CALL_TIMEOUT,
            )
            assert sum(item.used_quantity for item in summary.items) == expected, summary

        assert process.terminate(timeout=20) == 0


async def test_a_connection_that_keeps_dying_or_a_statement_that_outlasts_its_bound_is_unavailable(
    postgres_url,
):
    """The bounds themselves, on the shared Database: a transaction whose connection dies on
    every attempt is tried ALLOT_DB_RETRY_ATTEMPTS times, then UNAVAILABLE; a statement longer
    than ALLOT_DB_COMMAND_TIMEOUT_SECONDS is cut off by then and UNAVAILABLE; the pool is left
    with live connections only and serves the next transaction."""
    bounds = DatabaseBounds(command_timeout=1, retry_attempts=3)
    db = Database(postgres_url, bounds)
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    attempts = 0

    async def killed_every_time(uow):
        nonlocal attempts
        attempts += 1
        pid = (await uow.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await uow.session.execute(text("SELECT 1"))

    try:
        with pytest.raises(Unavailable) as raised:
            await db.transaction(killed_every_time)
        assert raised.value.reason == "DATABASE_UNAVAILABLE"
        assert attempts == bounds.retry_attempts

        started = time.monotonic()
        with pytest.raises(Unavailable):
            await db.read(lambda uow: uow.session.execute(text("SELECT pg_sleep(30)")))
        assert time.monotonic() - started < bounds.command_timeout + 2

        assert await db.read(lambda uow: uow.rows(text("SELECT 1"))) == [(1,)]

        # Our end of the socket probes a silent peer (asyncpg has no option for it).
        async with db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            sock = raw.driver_connection._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == bounds.keepalive
    finally:
        await admin.close()
        await db.dispose()
