"""`WatchEvents` of a quota process: history in order, then live events, filters and resumption.

One quota process (SQLite) serves the whole module; every test uses its own account and looks
at the stream as a consumer would: from 0 (everything, gap-free) or after a sequence. Live
events must arrive within LIVE_WITHIN seconds, also when another replica on the same database
commits them (that stream polls instead of being woken). Only operators and services may
watch (docs/security.md).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from shared.status import bad_request_fields, error_info
from tests.support.quota import quota_env, quota_process
from tests.support.servers import Tokens

REGION = "ap-southeast-1"
API = "passport"
# No contract states how soon a live event arrives; this only tells a live stream (woken at
# once, or polling every POLL_SECONDS = 0.5 s for another replica's commits) from one that is
# not, with room for a loaded 2-core machine.
LIVE_WITHIN = 10.0
READ_TIMEOUT = 30.0

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())

Event = quota_pb2.QuotaEvent


@pytest.fixture(scope="module")
def quota_db(tmp_path_factory):
    data = tmp_path_factory.mktemp("quota")
    return f"sqlite+aiosqlite:///{data / 'quota.db'}", data


@pytest.fixture(scope="module")
def quota_addr(quota_db):
    url, data = quota_db
    with quota_process(quota_env(url, data), data / "quota.log") as process:
        yield process.addr


@pytest.fixture
async def stub(quota_addr):
    async with grpc.aio.insecure_channel(quota_addr) as channel:
        yield quota_service_pb2_grpc.QuotaServiceStub(channel)


def usage(event_id: str, account: str) -> quota_service_pb2.ReportUsageRequest:
    return quota_service_pb2.ReportUsageRequest(
        event_id=event_id,
        account_id=account,
        user_id="u1",
        region=REGION,
        api=API,
        quantity=1,
        http_status=200,
    )


async def report(stub, account: str, event_ids: list[str]) -> None:
    response = await stub.BatchReportUsage(
        quota_service_pb2.BatchReportUsageRequest(requests=[usage(e, account) for e in event_ids]),
        metadata=GATEWAY,
        timeout=READ_TIMEOUT,
    )
    assert all(not r.HasField("error") for r in response.responses)


def watch(stub, after: int = 0, types: tuple[str, ...] = (), metadata=ADMIN):
    return stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=after, event_types=list(types)),
        metadata=metadata,
    )


async def take_until(call, done: Callable[[Event], bool]) -> list[Event]:
    """Read `call` until an event satisfies `done` (bounded); leaves the call open."""
    events: list[Event] = []
    async with asyncio.timeout(READ_TIMEOUT):
        while True:
            event = await call.read()
            assert event is not grpc.aio.EOF, "the stream ended"
            events.append(event)
            if done(event):
                return events


def usage_id(event: Event) -> str:
    return event.pay_per_use_recorded.usage_event_id


def is_usage(event_id: str) -> Callable[[Event], bool]:
    return lambda event: usage_id(event) == event_id


def assert_gap_free(events: list[Event], after: int = 0) -> None:
    assert [e.sequence for e in events] == list(range(after + 1, after + 1 + len(events)))


async def test_history_in_order_then_live_events(stub):
    ids = [f"hist-{i}" for i in range(40)]
    await report(stub, "acct-hist", ids)
    call = watch(stub)
    try:
        history = await take_until(call, is_usage(ids[-1]))
        assert_gap_free(history)
        ours = [usage_id(e) for e in history if e.pay_per_use_recorded.account_id == "acct-hist"]
        assert ours == ids
        assert all(e.event_id and e.HasField("create_time") for e in history)

        # The stream stays open: each new event arrives while we wait for it.
        for i in range(5):
            started = time.monotonic()
            await stub.ReportUsage(usage(f"live-{i}", "acct-hist"), metadata=GATEWAY)
            live = await take_until(call, is_usage(f"live-{i}"))
            assert time.monotonic() - started < LIVE_WITHIN
            history.extend(live)
        assert_gap_free(history)
    finally:
        call.cancel()


async def test_live_events_committed_by_another_replica(stub, quota_db):
    """A second quota process on the same database commits; this stream is not woken by it and
    must find the event by polling."""
    url, data = quota_db
    await report(stub, "acct-replica", ["replica-start"])
    call = watch(stub)
    try:
        await take_until(call, is_usage("replica-start"))
        with quota_process(quota_env(url, data), data / "quota-replica.log") as replica:
            async with grpc.aio.insecure_channel(replica.addr) as channel:
                other = quota_service_pb2_grpc.QuotaServiceStub(channel)
                for i in range(3):
                    started = time.monotonic()
                    await other.ReportUsage(usage(f"replica-{i}", "acct-replica"), metadata=GATEWAY)
                    await take_until(call, is_usage(f"replica-{i}"))
                    assert time.monotonic() - started < LIVE_WITHIN
    finally:
        call.cancel()


async def grant(stub, account: str, quantity: int) -> quota_pb2.Package:
    expire = datetime.now(UTC) + timedelta(days=365)
    return await stub.GrantPackage(
        quota_service_pb2.GrantPackageRequest(
            package=quota_pb2.Package(
                account_id=account,
                region=REGION,
                api=API,
                source=quota_pb2.PACKAGE_SOURCE_SUBSCRIPTION,
                total_quantity=quantity,
                expire_time={"seconds": int(expire.timestamp())},
            )
        ),
        metadata=ADMIN,
    )


async def full_history(stub, last_usage_id: str) -> list[Event]:
    call = watch(stub)
    try:
        return await take_until(call, is_usage(last_usage_id))
    finally:
        call.cancel()


async def test_event_types_filter(stub):
    """Only the named payload types, in sequence order, exactly those of the full history."""
    package = await grant(stub, "acct-filter", 3)
    await report(stub, "acct-filter", [f"filter-{i}" for i in range(5)])  # 3 from the package
    await report(stub, "acct-filter-end", ["filter-end"])
    history = await full_history(stub, "filter-end")
    assert_gap_free(history)

    def exhausted(event: Event) -> bool:
        changed = event.package_state_changed
        return (
            changed.package.package_id == package.package_id
            and changed.package.state == quota_pb2.PACKAGE_STATE_EXHAUSTED
        )

    assert any(exhausted(e) for e in history)
    cases = [
        (("pay_per_use_recorded",), is_usage("filter-end")),
        (("package_state_changed",), exhausted),
        (("package_state_changed", "pay_per_use_recorded"), is_usage("filter-end")),
    ]
    for types, done in cases:
        call = watch(stub, types=types)
        try:
            got = await take_until(call, done)
        finally:
            call.cancel()
        assert {e.WhichOneof("payload") for e in got} <= set(types)
        expected = [e for e in history if e.WhichOneof("payload") in types]
        assert got == expected[: len(got)]
        assert [e.sequence for e in got] == sorted(e.sequence for e in got)
    ours = [usage_id(e) for e in history if e.pay_per_use_recorded.account_id == "acct-filter"]
    assert ours == ["filter-3", "filter-4"]


async def test_after_sequence_resumes_exactly_after(stub):
    ids = [f"resume-{i}" for i in range(30)]
    await report(stub, "acct-resume", ids)
    history = await full_history(stub, ids[-1])
    for after in (0, 1, len(history) // 2, len(history) - 1):
        call = watch(stub, after=after)
        try:
            got = await take_until(call, is_usage(ids[-1]))
        finally:
            call.cancel()
        assert got == history[after:]
    # After the last sequence: nothing until something new is committed.
    call = watch(stub, after=history[-1].sequence)
    try:
        await report(stub, "acct-resume", ["resume-next"])
        (nxt,) = await take_until(call, is_usage("resume-next"))
        assert nxt.sequence == history[-1].sequence + 1
    finally:
        call.cancel()


async def first_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(READ_TIMEOUT):
            await call.read()
    return caught.value


async def test_unknown_event_type_is_invalid_argument(stub):
    error = await first_error(watch(stub, types=("pay_per_use_recorded", "no_such_event")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["event_types"]
    assert "no_such_event" in error.details()
    error = await first_error(watch(stub, after=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["after_sequence"]


async def test_only_admins_and_the_consuming_services_may_watch(stub):
    for token in (
        TOKENS.account("acct-hist"),
        TOKENS.account("acct-hist", read_only=True),
        TOKENS.gateway(),
    ):
        error = await first_error(watch(stub, metadata=TOKENS.md(token)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error) is not None
    error = await first_error(watch(stub, metadata=()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # The services that consume it (billing, notification) may.
    await report(stub, "acct-auth", ["auth-0"])
    call = watch(stub, metadata=TOKENS.md(TOKENS.internal("notification")))
    try:
        await take_until(call, is_usage("auth-0"))
    finally:
        call.cancel()


async def test_sigterm_ends_open_streams_promptly(tmp_path):
    grace = 6.0
    env = quota_env(
        f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}",
        tmp_path,
        ALLOT_SHUTDOWN_GRACE_SECONDS=str(int(grace)),
    )
    with quota_process(env, tmp_path / "quota.log") as process:
        async with grpc.aio.insecure_channel(process.addr) as channel:
            stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
            call = watch(stub)
            # The stream is open and live: it carries an event written after it opened; then
            # nothing more comes (idle) when the signal arrives.
            await report(stub, "acct-sigterm", ["sigterm-open"])
            await take_until(call, is_usage("sigterm-open"))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            ended = None
            async with asyncio.timeout(grace + 10):
                try:
                    ended = await call.read()
                except grpc.aio.AioRpcError as error:
                    ended = error.code()
            # Ended by the server (end of stream or a code a consumer retries), not by our bound.
            assert ended in (grpc.aio.EOF, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            await asyncio.to_thread(process.wait, grace + 10)
            # In-flight unary calls may use the grace; a stream that never ends should not.
            assert time.monotonic() - started < grace / 2
