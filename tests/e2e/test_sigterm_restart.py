"""Stopping quota in the middle of a usage load, then restarting it on the same database.

A gateway only trusts what was acknowledged and retries the rest. So after the restart every
acknowledged event must be recorded exactly once with the result it was acknowledged with;
an unacknowledged event may or may not have been committed, but never half and never twice;
and the package's used quantity must equal the deductions of the events recorded
(docs/design/deduction-order.md, "Exactly once"). On SIGTERM the process says NOT_SERVING, lets
in-flight calls finish for the grace period and exits 0 (docs/architecture.md, "Shared pieces").
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from tests.support.quota import QuotaProcess, quota_env, quota_process
from tests.support.servers import Tokens

ACCOUNT = "acct-sigterm"
REGION = "ap-southeast-1"
API = "passport"
# Large enough that the load never exhausts it: used_quantity then counts every recorded unit.
PACKAGE_SIZE = 5000
TASKS = 4
EVENTS_PER_TASK = 300
STOP_AFTER = 120  # acknowledged events
GRACE_SECONDS = 10
# The slack covers closing the engine and the interpreter's exit on a loaded machine.
EXIT_SLACK = 8
CALL_TIMEOUT = 30.0
LOAD_TIMEOUT = 120.0
# What a call may end with when the server goes away under it.
SHUTDOWN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def usage(event_id: str) -> quota_service_pb2.ReportUsageRequest:
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=ACCOUNT,
        user_id="u1",
        region=REGION,
        api=API,
        quantity=1,
        http_status=200,
    )


def package_units(response) -> int:
    return sum(d.quantity for d in response.deductions)


def without_duplicate(response: quota_service_pb2.ReportUsageResponse):
    copy = quota_service_pb2.ReportUsageResponse()
    copy.CopyFrom(response)
    copy.duplicate = False
    return copy


def quota_stub(channel) -> quota_service_pb2_grpc.QuotaServiceStub:
    return quota_service_pb2_grpc.QuotaServiceStub(channel)


async def grant(stub) -> quota_pb2.Package:
    return await stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(
            request_id="grant-1",
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


async def get_package(stub, package_id: str) -> quota_pb2.Package:
    return await stub.GetPackage(
        quota_service_pb2.GetPackageRequest(package_id=package_id),
        metadata=ADMIN,
        timeout=CALL_TIMEOUT,
    )


async def wait_exit(process: QuotaProcess, within: float) -> int:
    """The exit code; subprocess.TimeoutExpired if the process still runs after `within` s."""
    return await asyncio.to_thread(process.wait, within)


@dataclass
class Load:
    acknowledged: dict[str, quota_service_pb2.ReportUsageResponse] = field(default_factory=dict)
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    stop_time: float | None = None

    @property
    def sent(self) -> list[str]:
        return sorted(self.acknowledged.keys() | self.failed.keys())


async def run_load(stub, stop) -> Load:
    """TASKS gateways report events one after another until the server goes away; `stop` is
    called once STOP_AFTER events were acknowledged. Each gateway stops at its first failure."""
    load = Load()

    async def gateway(task: int) -> None:
        for i in range(EVENTS_PER_TASK):
            event_id = f"t{task}-{i:03d}"
            try:
                response = await stub.ReportUsage(
                    usage(event_id), metadata=GATEWAY, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as error:
                load.failed[event_id] = error.code()
                return
            load.acknowledged[event_id] = response
            if load.stop_time is None and len(load.acknowledged) >= STOP_AFTER:
                load.stop_time = time.monotonic()
                stop()

    await asyncio.wait_for(asyncio.gather(*(gateway(t) for t in range(TASKS))), LOAD_TIMEOUT)
    return load


async def watch_health(channel, seen: list[int]) -> None:
    """Follow the overall health until it says NOT_SERVING, then hang up (an open stream would
    otherwise hold the shutdown for the whole grace period)."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async for response in call:
            seen.append(response.status)
            if response.status == NOT_SERVING:
                return
    except grpc.aio.AioRpcError:
        return  # the server went away without saying NOT_SERVING first; `seen` tells
    finally:
        call.cancel()


async def explain(stub, event_id: str) -> quota_pb2.UsageExplanation | None:
    try:
        return await stub.ExplainUsage(
            quota_service_pb2.ExplainUsageRequest(event_id=event_id),
            metadata=ADMIN,
            timeout=CALL_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return None


async def check_after_restart(stub, package_id: str, load: Load) -> None:
    """The invariants of the second life, then a gateway's retry of everything it sent."""
    sent = load.sent
    explanations = await asyncio.gather(*(explain(stub, e) for e in sent))
    recorded = {e: x for e, x in zip(sent, explanations, strict=True) if x is not None}

    # Every acknowledged event is recorded, with what it was acknowledged with.
    assert load.acknowledged.keys() <= recorded.keys()
    for event_id, response in load.acknowledged.items():
        explanation = recorded[event_id]
        assert sum(c.deducted_quantity for c in explanation.candidates) == package_units(response)
        assert explanation.pay_per_use_quantity == response.pay_per_use_quantity

    # The package paid exactly the events recorded, each once.
    paid = [sum(c.deducted_quantity for c in x.candidates) for x in recorded.values()]
    assert paid == [1] * len(recorded)
    assert (await get_package(stub, package_id)).used_quantity == len(recorded)
    # Each acknowledged event saw its own remainder: none was applied twice.
    remainders = [r.remaining_quantity for r in load.acknowledged.values()]
    assert len(set(remainders)) == len(remainders)
    assert min(remainders, default=PACKAGE_SIZE) >= PACKAGE_SIZE - len(recorded)

    # The gateway retries everything. Acknowledged events answer as before; an unacknowledged
    # one that committed is a duplicate; the rest are recorded now.
    retried = await asyncio.gather(
        *(stub.ReportUsage(usage(e), metadata=GATEWAY, timeout=CALL_TIMEOUT) for e in sent)
    )
    for event_id, replay in zip(sent, retried, strict=True):
        assert replay.duplicate == (event_id in recorded), event_id
        if event_id in load.acknowledged:
            assert without_duplicate(replay) == load.acknowledged[event_id]
        assert package_units(replay) == 1
    final = await get_package(stub, package_id)
    assert final.used_quantity == len(sent)
    assert final.remaining_quantity == PACKAGE_SIZE - len(sent)


async def test_sigterm_mid_load_loses_and_doubles_nothing(database_url, tmp_path):
    env = quota_env(database_url, tmp_path, ALLOT_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS))
    with quota_process(env, tmp_path / "quota-1.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_stub(channel)
            package = await grant(stub)
            health_seen: list[int] = []
            watcher = asyncio.create_task(watch_health(channel, health_seen))
            load = await run_load(stub, process.send_signal)
            exit_code = await wait_exit(process, GRACE_SECONDS + EXIT_SLACK)
            assert load.stop_time is not None, "the load ended before SIGTERM was sent"
            exit_seconds = time.monotonic() - load.stop_time
            await asyncio.wait_for(watcher, CALL_TIMEOUT)

    assert exit_code == 0, process.log_text()
    assert exit_seconds < GRACE_SECONDS + EXIT_SLACK
    assert load.failed, "SIGTERM came too late: no call failed"
    unexpected = {e: c for e, c in load.failed.items() if c not in SHUTDOWN_CODES}
    assert not unexpected, f"calls failed for other reasons than the shutdown: {unexpected}"
    assert health_seen[:1] == [SERVING] and health_seen[-1] == NOT_SERVING, health_seen
    assert all(not r.duplicate and package_units(r) == 1 for r in load.acknowledged.values())

    env = quota_env(database_url, tmp_path)
    with quota_process(env, tmp_path / "quota-2.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            await check_after_restart(quota_stub(channel), package.package_id, load)
        assert process.terminate(timeout=GRACE_SECONDS + EXIT_SLACK) == 0


async def test_crash_mid_load_loses_and_doubles_nothing(database_url, tmp_path):
    """SIGKILL: no grace at all. Calls in flight may have committed without an answer."""
    env = quota_env(database_url, tmp_path)
    with quota_process(env, tmp_path / "quota-1.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_stub(channel)
            package = await grant(stub)
            load = await run_load(stub, lambda: process.send_signal(signal.SIGKILL))
            assert await wait_exit(process, EXIT_SLACK) == -signal.SIGKILL
    assert load.failed, "SIGKILL came too late: no call failed"

    env = quota_env(database_url, tmp_path)
    with quota_process(env, tmp_path / "quota-2.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            await check_after_restart(quota_stub(channel), package.package_id, load)


# --- calls that outlast the grace period ---------------------------------------------------

SHORT_GRACE = 2
BLOCKED_CALLS = 4
LOCK_WAIT_TIMEOUT = 20.0


class WriteLock:
    """Another writer holding what ReportUsage needs: the package row on PostgreSQL, the
    database's write lock on SQLite."""

    def __init__(self, database_url: str) -> None:
        self.url = make_url(database_url)
        self._sqlite: sqlite3.Connection | None = None
        self._postgres: asyncpg.Connection | None = None

    async def hold(self, package_id: str) -> None:
        if self.url.get_backend_name() == "sqlite":
            self._sqlite = sqlite3.connect(self.url.database, isolation_level=None, timeout=10)
            self._sqlite.execute("BEGIN IMMEDIATE")
            return
        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._postgres = await asyncpg.connect(dsn, timeout=10)
        await self._postgres.execute("BEGIN")
        await self._postgres.execute(
            "SELECT 1 FROM packages WHERE package_id = $1 FOR UPDATE", package_id
        )

    async def wait_for_waiter(self, stub, package_id: str) -> None:
        """Until the calls are in quota and (PostgreSQL can tell) waiting for the lock.

        Barrier: a read on the same channel, sent after them, answered. HTTP/2 delivers the
        calls to the server in order on the one connection and their handlers start in that
        order, so by the answer every ReportUsage has reached the server and is in its
        handler, held by the lock (which stays held past the grace). PostgreSQL also shows the
        waiting session; concurrent ReportUsage calls are coalesced into one transaction, so
        one waiting session is all there is to see."""
        assert (await get_package(stub, package_id)).package_id == package_id
        if self._postgres is None:
            return
        deadline = time.monotonic() + LOCK_WAIT_TIMEOUT
        while time.monotonic() < deadline:
            waiting = await self._postgres.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= 1:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("no call waited for the row lock")

    async def release(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()  # rolls back
            self._sqlite = None
        if self._postgres is not None:
            await self._postgres.close()  # rolls back
            self._postgres = None


@pytest.mark.parametrize(
    "database_url",
    [
        "postgresql",
        "sqlite",
    ],
    indirect=True,
)
async def test_sigterm_exits_within_grace_when_calls_outlast_it(database_url, tmp_path):
    env = quota_env(database_url, tmp_path, ALLOT_SHUTDOWN_GRACE_SECONDS=str(SHORT_GRACE))
    lock = WriteLock(database_url)
    with quota_process(env, tmp_path / "quota-1.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_stub(channel)
            package = await grant(stub)
            ids = [f"blocked-{i}" for i in range(BLOCKED_CALLS)]
            calls: list[asyncio.Future] = []
            await lock.hold(package.package_id)
            try:
                calls += [
                    asyncio.ensure_future(
                        stub.ReportUsage(usage(e), metadata=GATEWAY, timeout=LOAD_TIMEOUT)
                    )
                    for e in ids
                ]
                await lock.wait_for_waiter(stub, package.package_id)
                assert not any(c.done() for c in calls)
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    exit_code = await wait_exit(process, SHORT_GRACE + EXIT_SLACK)
                except subprocess.TimeoutExpired as exc:
                    raise AssertionError("quota outlived its grace period") from exc
                stopping = time.monotonic() - signalled
            finally:
                await lock.release()
                process.kill()
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert exit_code == 0, process.log_text()
    # The case under test happened: the calls held the server for its whole grace.
    assert stopping >= SHORT_GRACE - 0.1, f"exited {stopping:.2f} s after SIGTERM"
    codes = [o.code() if isinstance(o, grpc.aio.AioRpcError) else o for o in outcomes]
    assert all(c in SHUTDOWN_CODES for c in codes), codes

    # Cut-off calls were rolled back whole: nothing of them is left half-done.
    env = quota_env(database_url, tmp_path)
    with quota_process(env, tmp_path / "quota-2.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_stub(channel)
            recorded = [x for x in await asyncio.gather(*(explain(stub, e) for e in ids)) if x]
            assert (await get_package(stub, package.package_id)).used_quantity == len(recorded)
