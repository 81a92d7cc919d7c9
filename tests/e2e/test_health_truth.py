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
import signal
import subprocess
import time

import asyncpg
import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.databases import POSTGRES_ADMIN_URL
from tests.support.processes import QuotaProcess, quota_env, quota_process
from tests.support.quota_calls import QuotaCalls
from tests.support.servers import Tokens

HEALTH_GRACE = 2  # ALLOT_HEALTH_DATABASE_GRACE_SECONDS
SHUTDOWN_GRACE = 2  # ALLOT_SHUTDOWN_GRACE_SECONDS
# NOT_SERVING comes after the grace and at most one check interval plus one ping timeout more
# (shared/server.py); SERVING at the next check after the database is back. The slack is for
# a loaded 2-core machine.
TURN_WITHIN = HEALTH_GRACE + 2 + 2 + 6
EXIT_WITHIN = SHUTDOWN_GRACE + 5
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
                await stub.GrantPackage(
                    quota_service_pb2.GrantPackageRequest(
                        request_id="grant-1",
                        package=quota_pb2.Package(
                            account_id=ACCOUNT,
                            region=REGION,
                            api=API,
                            source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                            total_quantity=100,
                            expire_time={"seconds": 4102444799},
                        ),
                    ),
                    metadata=ADMIN,
                    timeout=CALL_TIMEOUT,
                )
                await stub.ReportUsage(usage("before"), metadata=GATEWAY, timeout=CALL_TIMEOUT)
                await health_becomes(health, SERVING, 1)

                await switch.take_away()
                took = await health_becomes(health, NOT_SERVING, TURN_WITHIN)
                assert took >= HEALTH_GRACE - 1, f"NOT_SERVING after {took:.1f}s, before grace"
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
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(process.wait, EXIT_WITHIN)
                except subprocess.TimeoutExpired as exc:
                    raise AssertionError(
                        f"quota still ran {EXIT_WITHIN}s after SIGTERM:\n{process.log_text()}"
                    ) from exc
                assert code == 0, process.log_text()
                assert time.monotonic() - started < EXIT_WITHIN
    finally:
        await switch.give_back()


class SilentProxy:
    """A loopback TCP proxy to PostgreSQL that can go silent: while cut, bytes in both
    directions are swallowed and new connections are accepted but never answered — a database
    behind a failover without reset, where nothing errors and nothing arrives."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        self._writers.append(writer)
        if self.cut:
            return  # accepted, never answered
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader, writer) -> None:
        while data := await reader.read(65536):
            if not self.cut:
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_sigterm_exits_within_grace_when_the_database_goes_silent(database_url, tmp_path):
    """Calls stuck on a database that no longer answers (not even with an error) must not hold
    the process past its shutdown grace: every shutdown step is bounded (shared/server.py)."""
    admin = POSTGRES_ADMIN_URL.rsplit("@", 1)[1].split("/", 1)[0]
    host, _, port = admin.partition(":")
    proxy = SilentProxy((host, int(port or 5432)))
    await proxy.start()
    proxied = database_url.replace(admin, f"127.0.0.1:{proxy.port}")
    env = quota_env(
        proxied,
        tmp_path,
        ALLOT_HEALTH_DATABASE_GRACE_SECONDS=str(HEALTH_GRACE),
        ALLOT_SHUTDOWN_GRACE_SECONDS=str(SHUTDOWN_GRACE),
    )
    # Started from a thread: the proxy runs on this test's event loop, which must keep going.
    process = QuotaProcess(env, tmp_path / "quota.log")
    try:
        await asyncio.to_thread(process.start)
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await stub.GrantPackage(
                quota_service_pb2.GrantPackageRequest(
                    request_id="grant-1",
                    package=quota_pb2.Package(
                        account_id=ACCOUNT,
                        region=REGION,
                        api=API,
                        source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                        total_quantity=100,
                        expire_time={"seconds": 4102444799},
                    ),
                ),
                metadata=ADMIN,
                timeout=CALL_TIMEOUT,
            )
            await stub.ReportUsage(usage("before"), metadata=GATEWAY, timeout=CALL_TIMEOUT)

            proxy.cut = True
            stuck = [
                asyncio.ensure_future(
                    stub.ReportUsage(usage(f"stuck-{i}"), metadata=GATEWAY, timeout=60)
                )
                for i in range(4)
            ]
            await health_becomes(health, NOT_SERVING, TURN_WITHIN)
            assert not any(call.done() for call in stuck)  # they wait on the silent database

            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(process.wait, EXIT_WITHIN)
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(
                    f"quota still ran {EXIT_WITHIN}s after SIGTERM:\n{process.log_text()}"
                ) from exc
            took = time.monotonic() - started
            outcomes = await asyncio.gather(*stuck, return_exceptions=True)
        assert code == 0, process.log_text()
        assert took < EXIT_WITHIN
        for outcome in outcomes:  # cut off by the shutdown, with a status a client retries
            assert isinstance(outcome, grpc.aio.AioRpcError), outcome
            assert outcome.code() in RETRYABLE | {grpc.StatusCode.CANCELLED}, outcome
    finally:
        process.kill()
        await proxy.close()
