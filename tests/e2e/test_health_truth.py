"""Health tells the truth about the database (docs/faults.md, "Health, probes and shutdown").

Quota runs as a process on its own PostgreSQL database. The test takes the database away
(`ALLOW_CONNECTIONS false`, which binds superusers too, and its backends terminated): within the
health grace plus a check interval health says NOT_SERVING, calls fail with a status a client
retries, and the process keeps running (liveness is not readiness). Given back, the database is
found again: health SERVING and `ReportUsage` answers. Taken away once more, a SIGTERM still
ends the process within its shutdown grace plus a few seconds — also when the database goes
silent behind a proxy (no error, no answer) with calls stuck on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time

import asyncpg
import grpc
import pytest
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.server import LIVENESS
from tests.support.databases import POSTGRES_ADMIN_URL
from tests.support.proxy import database_addr, tcp_proxy, through
from tests.support.quota import QuotaCalls, quota_env, quota_process
from tests.support.servers import Tokens

HEALTH_GRACE = 2  # ALLOT_HEALTH_DATABASE_GRACE_SECONDS
SHUTDOWN_GRACE = 2  # ALLOT_SHUTDOWN_GRACE_SECONDS
# NOT_SERVING comes after the grace and at most one check interval plus one ping timeout more
# (shared/server.py); SERVING at the next check after the database is back. The slack is for
# a loaded 2-core machine.
TURN_WITHIN = HEALTH_GRACE + 2 + 2 + 6
EXIT_WITHIN = SHUTDOWN_GRACE + 5
# The half-open database: silent this long, then usage recorded again within HEAL_WITHIN.
SILENT_SECONDS = 15
HEAL_WITHIN = 5.0
CUT_CALL_TIMEOUT = 3.0
CALL_TIMEOUT = 5.0
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
SERVICE = "allot.quota.v1.QuotaService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())
ACCOUNT = "acct-health"
REGION = "ap-southeast-1"
API = "passport"


class DatabaseSwitch:
    """Takes a PostgreSQL database away from everyone (its sessions ended, no new ones) and
    gives it back."""

    def __init__(self, url: str) -> None:
        self.name = url.rsplit("/", 1)[1]

    async def _admin(self, *statements: tuple) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            for statement in statements:
                await conn.execute(*statement)
        finally:
            await conn.close()

    async def take_away(self) -> None:
        await self._admin(
            (f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false',),
            (
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                self.name,
            ),
        )

    async def give_back(self) -> None:
        await self._admin((f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true',))


def usage(event_id: str) -> quota_service_pb2.ReportUsageRequest:
    return QuotaCalls.usage(event_id, ACCOUNT, region=REGION, api=API)


async def grant(stub) -> None:
    package = QuotaCalls.package(
        ACCOUNT, 100, region=REGION, api=API, expire="2099-12-31T23:59:59Z"
    )
    request = quota_service_pb2.GrantPackageRequest(request_id="grant-1", package=package)
    await stub.GrantPackage(request, metadata=ADMIN, timeout=CALL_TIMEOUT)


async def sigterm(process) -> tuple[int, float]:
    """SIGTERM, then the exit code and how long the exit took; AssertionError (with the log)
    when the process still runs EXIT_WITHIN seconds later."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(process.wait, EXIT_WITHIN)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"quota still ran {EXIT_WITHIN}s after SIGTERM:\n{process.log_text()}"
        ) from exc
    return code, time.monotonic() - started


async def health_becomes(health, status, within: float) -> float:
    """Seconds until every checked name reports `status`; AssertionError after `within`."""
    start = time.monotonic()
    seen = None
    while time.monotonic() - start < within:
        answers = []
        for name in ("", SERVICE):
            request = health_pb2.HealthCheckRequest(service=name)
            answers.append((await health.Check(request, timeout=CALL_TIMEOUT)).status)
        seen = answers
        if all(a == status for a in answers):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"health {seen}, not {status}, within {within} s")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_health_follows_the_database_and_sigterm_stays_bounded(database_url, tmp_path):
    switch = DatabaseSwitch(database_url)
    env = quota_env(
        database_url,
        tmp_path,
        ALLOT_HEALTH_DATABASE_GRACE_SECONDS=str(HEALTH_GRACE),
        ALLOT_SHUTDOWN_GRACE_SECONDS=str(SHUTDOWN_GRACE),
    )
    try:
        with quota_process(env, tmp_path / "quota.log") as process:
            async with grpc.aio.insecure_channel(process.addr) as channel:
                stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                await grant(stub)
                await stub.ReportUsage(usage("before"), metadata=GATEWAY, timeout=CALL_TIMEOUT)
                await health_becomes(health, SERVING, 1)

                await switch.take_away()
                took = await health_becomes(health, NOT_SERVING, TURN_WITHIN)
                assert took >= HEALTH_GRACE - 1, f"NOT_SERVING after {took:.1f}s, before grace"
                # Liveness does not follow the database: no restart for an outage.
                live = await health.Check(
                    health_pb2.HealthCheckRequest(service=LIVENESS), timeout=CALL_TIMEOUT
                )
                assert live.status == SERVING
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ReportUsage(usage("during"), metadata=GATEWAY, timeout=CALL_TIMEOUT)
                assert refused.value.code() in RETRYABLE, refused.value
                assert process.proc is not None and process.proc.poll() is None  # still alive

                await switch.give_back()
                await health_becomes(health, SERVING, TURN_WITHIN)
                answer = await stub.ReportUsage(
                    usage("during"), metadata=GATEWAY, timeout=CALL_TIMEOUT
                )
                assert sum(d.quantity for d in answer.deductions) == 1

                await switch.take_away()
                code, took = await sigterm(process)
                assert code == 0, process.log_text()
                assert took < EXIT_WITHIN
    finally:
        await switch.give_back()


@contextlib.asynccontextmanager
async def quota_behind_a_proxy(database_url, tmp_path):
    """Quota on `database_url` reached through a `TcpProxy` the test can cut and heal."""
    with tcp_proxy(database_addr(database_url)) as proxy:
        env = quota_env(
            through(database_url, proxy),
            tmp_path,
            ALLOT_HEALTH_DATABASE_GRACE_SECONDS=str(HEALTH_GRACE),
            ALLOT_SHUTDOWN_GRACE_SECONDS=str(SHUTDOWN_GRACE),
        )
        with quota_process(env, tmp_path / "quota.log") as process:
            async with grpc.aio.insecure_channel(process.addr) as channel:
                stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
                await grant(stub)
                await stub.ReportUsage(usage("before"), metadata=GATEWAY, timeout=CALL_TIMEOUT)
                yield proxy, process, stub, health_pb2_grpc.HealthStub(channel)


async def first_success(stub, event_id: str, within: float) -> float:
    """Seconds until `ReportUsage` of `event_id` answers (each try bounded by a short
    deadline, retried as a gateway would); AssertionError after `within`."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < within:
        try:
            await stub.ReportUsage(usage(event_id), metadata=GATEWAY, timeout=1.0)
            return time.monotonic() - start
        except grpc.aio.AioRpcError as error:
            assert error.code() in RETRYABLE, error
            last = error
            await asyncio.sleep(0.1)
    raise AssertionError(f"no ReportUsage answered within {within} s after healing: {last}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_silent_database_fails_calls_within_their_deadline_and_heals(
    database_url, tmp_path
):
    """A failover without reset: the database goes silent for SILENT_SECONDS (no error, no
    answer; every connection that lived through it stays dead for good), then new
    connections work again. During the cut calls end by their deadline with a status a
    client retries and health turns NOT_SERVING; within HEAL_WITHIN of healing, usage is
    recorded again and health is SERVING — no restart."""
    async with quota_behind_a_proxy(database_url, tmp_path) as (proxy, process, stub, health):
        proxy.cut()
        cut_at = time.monotonic()
        outcomes = []
        while time.monotonic() - cut_at < SILENT_SECONDS - CUT_CALL_TIMEOUT - 1:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ReportUsage(
                    usage(f"cut-{len(outcomes)}"), metadata=GATEWAY, timeout=CUT_CALL_TIMEOUT
                )
            outcomes.append((failed.value.code(), time.monotonic() - started))
            await asyncio.sleep(0.05)  # a gateway backs off a little
        assert all(code in RETRYABLE for code, _ in outcomes), outcomes
        assert all(took < CUT_CALL_TIMEOUT + 1 for _, took in outcomes), outcomes
        await health_becomes(
            health, NOT_SERVING, max(0.5, SILENT_SECONDS - (time.monotonic() - cut_at))
        )
        await asyncio.sleep(max(0.0, SILENT_SECONDS - (time.monotonic() - cut_at)))

        proxy.heal()
        took = await first_success(stub, "after", HEAL_WITHIN)
        print(f"usage recorded {took:.2f} s after healing; {len(outcomes)} calls failed in the cut")
        await health_becomes(health, SERVING, HEAL_WITHIN - took)
        assert process.proc is not None and process.proc.poll() is None  # never restarted
        # What failed during the cut was not recorded: sent again, each is new.
        for i in range(len(outcomes)):
            answer = await stub.ReportUsage(
                usage(f"cut-{i}"), metadata=GATEWAY, timeout=CALL_TIMEOUT
            )
            assert not answer.duplicate, answer
            assert sum(d.quantity for d in answer.deductions) + answer.pay_per_use_quantity == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_sigterm_exits_within_grace_when_the_database_goes_silent(database_url, tmp_path):
    """Calls stuck on a database that no longer answers (not even with an error) must not hold
    the process past its shutdown grace: every shutdown step is bounded (shared/server.py)."""
    async with quota_behind_a_proxy(database_url, tmp_path) as (proxy, process, stub, health):
        proxy.cut()
        stuck = [
            asyncio.ensure_future(
                stub.ReportUsage(usage(f"stuck-{i}"), metadata=GATEWAY, timeout=60)
            )
            for i in range(4)
        ]
        await health_becomes(health, NOT_SERVING, TURN_WITHIN)
        assert not any(call.done() for call in stuck)  # they wait on the silent database

        code, took = await sigterm(process)
        outcomes = await asyncio.gather(*stuck, return_exceptions=True)
    assert code == 0, process.log_text()
    assert took < EXIT_WITHIN
    for outcome in outcomes:  # cut off by the shutdown, with a status a client retries
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() in RETRYABLE | {grpc.StatusCode.CANCELLED}, outcome
