"""Bounded resources and scoped streams (docs/security.md): streams per caller are capped,
streams only carry what the token may see (its account, its regions, filtered in SQL),
test notifications are rate-limited per contact, and oversized requests, batches, pages and
metadata are refused with clear codes (never INTERNAL).

Real in-process quota and notification servers on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from allot.quota.v1 import quota_service_pb2

from services.notification.app import notifications
from services.notification.domain.messages import StandingChanged, UsageAlertFired, compose
from shared.auth import ADMIN
from shared.status import error_info
from tests.support.calls import expect_error
from tests.support.events import PACKAGE_STATE_CHANGED, events
from tests.support.notification import (
    ARREARS,
    CLOCK_START,
    EMAIL,
    TEST,
    NotificationCalls,
    notification_settings,
    running_notification,
)
from tests.support.quota import ACCOUNT, OTHER_ACCOUNT, OTHER_REGION, REGION, QuotaCalls
from tests.support.receivers import closed_port, smtp_receiver

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
WAIT = 30.0
MAX_STREAMS = 16  # ALLOT_MAX_STREAMS_PER_CALLER's default


@pytest.fixture
def q(quota) -> QuotaCalls:
    return QuotaCalls(quota)


def watch_events(q: QuotaCalls, metadata, after: int = 0):
    return q.stub.WatchEvents(
        quota_service_pb2.WatchEventsRequest(after_sequence=after), metadata=metadata, timeout=60
    )


def region_of(event) -> str:
    payload = getattr(event, event.WhichOneof("payload"))
    fields = payload.DESCRIPTOR.fields_by_name
    return payload.region if "region" in fields else payload.package.region


# --- streams per caller ------------------------------------------------------------------


async def test_a_caller_holds_at_most_16_streams_and_closing_one_frees_a_slot(q):
    # One event (an activation), so every open stream answers at once.
    await q.grant(effective="2024-01-02T00:00:00Z")
    await q.set_time("2024-01-02T00:00:00Z")
    admin = q.admin
    held = [watch_events(q, admin) for _ in range(MAX_STREAMS)]
    try:
        for call in held:  # each is being served (and counted) once it answered
            assert (await asyncio.wait_for(call.read(), WAIT)).sequence == 1
        error = await expect_error(watch_events(q, admin).read(), EXHAUSTED, "TOO_MANY_STREAMS")
        assert error_info(error).metadata["limit"] == str(MAX_STREAMS)

        # Another principal (another admin, the notification service) is not affected.
        other_admin = q.tokens.md(q.tokens.signer.mint(ADMIN, user="another-operator"))
        for metadata in (other_admin, q.tokens.md(q.tokens.internal("notification"))):
            other = watch_events(q, metadata)
            assert (await asyncio.wait_for(other.read(), WAIT)).sequence == 1
            other.cancel()

        # Closing one frees its slot (once the server has seen the cancellation).
        held.pop().cancel()
        for _ in range(200):
            again = watch_events(q, admin)
            try:
                event = await asyncio.wait_for(again.read(), WAIT)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == EXHAUSTED
                await asyncio.sleep(0.05)
                continue
            held.append(again)
            assert event.sequence == 1
            break
        else:
            raise AssertionError("the closed stream's slot was never freed")
        await expect_error(watch_events(q, admin).read(), EXHAUSTED, "TOO_MANY_STREAMS")
    finally:
        for call in held:
            call.cancel()


# --- region scope of WatchEvents ---------------------------------------------------------


async def test_a_region_limited_token_watches_only_its_regions_events(q):
    for region in (REGION, OTHER_REGION, REGION):
        await q.grant(region=region, effective="2024-01-02T00:00:00Z")
    await q.set_time("2024-01-02T00:00:00Z")  # three activations

    everything = await events(q.stub, q.admin, types=[PACKAGE_STATE_CHANGED], at_least=3)
    assert sorted(region_of(e) for e in everything) == sorted([REGION, OTHER_REGION, REGION])

    limited = q.tokens.md(q.tokens.admin(regions=[REGION]))
    mine = await events(q.stub, limited, at_least=2)
    assert [region_of(e) for e in mine] == [REGION, REGION]
    # The same events, with the sequences of the whole stream (cursors stay valid).
    assert [e.sequence for e in mine] == [e.sequence for e in everything if region_of(e) == REGION]
    # From a cursor past the first: only later events of its regions.
    later = await events(q.stub, limited, after=mine[0].sequence, at_least=1)
    assert [e.sequence for e in later] == [mine[1].sequence]


# --- WatchNotifications: the account's, of the token's regions ---------------------------


@pytest.fixture
async def notification(database_url, tmp_path):
    settings = notification_settings(database_url, tmp_path, f"127.0.0.1:{closed_port()}")
    async with running_notification(settings) as handle:
        yield handle


def usage_alert(account_id: str, region: str, alert_id: str):
    return compose(UsageAlertFired(alert_id, account_id, region, "passport", 10, 100, "10%"))


def arrears(account_id: str):
    return compose(StandingChanged(account_id, "GOOD", "GRACE", "-1.00 USD", None, None))


async def test_watch_notifications_is_the_accounts_own_and_of_the_tokens_regions(notification):
    n: NotificationCalls = notification.calls
    ctx = notification.server.service.context

    async def take(message, source: str) -> None:
        await ctx.db.transaction(lambda uow: notifications.take(ctx, uow, message, source))

    streams = {
        "a": n.watch(ACCOUNT, n.account(ACCOUNT)),
        "a in one region": n.watch(
            ACCOUNT, n.tokens.md(n.tokens.account(ACCOUNT, regions=[REGION]))
        ),
        "b": n.watch(OTHER_ACCOUNT, n.account(OTHER_ACCOUNT)),
    }
    reads = {name: asyncio.ensure_future(call.read()) for name, call in streams.items()}
    try:
        # A stream starts at the newest notification when it opens: warm up until each one
        # has seen a notification of its account (then it is surely live).
        for i in range(200):
            await take(arrears(ACCOUNT), f"warm-a-{i}")
            await take(arrears(OTHER_ACCOUNT), f"warm-b-{i}")
            await asyncio.wait(reads.values(), timeout=0.1)
            if all(r.done() for r in reads.values()):
                break
        assert all(r.done() for r in reads.values()), "the streams never went live"

        await take(usage_alert(OTHER_ACCOUNT, REGION, "b-1"), "b-alert")
        await take(usage_alert(ACCOUNT, OTHER_REGION, "a-1"), "a-other-region")
        await take(usage_alert(ACCOUNT, REGION, "a-2"), "a-region")
        await take(arrears(OTHER_ACCOUNT), "b-end")
        await take(arrears(ACCOUNT), "a-end")

        seen: dict[str, list[tuple[str, str]]] = {}
        for name, call in streams.items():
            end = "b-end" if name == "b" else "a-end"
            got: list[tuple[str, str]] = []
            for _ in range(1000):  # bounded: the warm-up wrote at most 400
                item = await asyncio.wait_for(call.read(), WAIT)
                if not item.source_event_id.startswith("warm-"):
                    got.append((item.account_id, item.source_event_id))
                if item.source_event_id == end:
                    break
            seen[name] = got
    finally:
        for call in streams.values():
            call.cancel()
    assert seen == {
        "a": [(ACCOUNT, "a-other-region"), (ACCOUNT, "a-region"), (ACCOUNT, "a-end")],
        # Regional notifications of its regions, and account-level ones (arrears).
        "a in one region": [(ACCOUNT, "a-region"), (ACCOUNT, "a-end")],
        "b": [(OTHER_ACCOUNT, "b-alert"), (OTHER_ACCOUNT, "b-end")],
    }


# --- SendTestNotification rate -----------------------------------------------------------


async def test_test_notifications_are_limited_per_contact_per_hour(database_url, tmp_path):
    start = datetime.fromisoformat(CLOCK_START.replace("Z", "+00:00")).astimezone(UTC)
    with smtp_receiver() as smtp:
        settings = notification_settings(
            database_url, tmp_path, f"127.0.0.1:{closed_port()}", smtp_url=smtp.url()
        )
        async with running_notification(settings) as handle:
            n = handle.calls
            own = n.account(ACCOUNT)
            first = await n.create(ACCOUNT, EMAIL, "ops@example.com", [ARREARS], own)
            second = await n.create(ACCOUNT, EMAIL, "dev@example.com", [ARREARS], own)
            for _ in range(3):
                await n.send_test(first.contact_id, own)
                await n.advance(timedelta(minutes=10))
            error = await expect_error(
                n.send_test(first.contact_id, own), EXHAUSTED, "TEST_NOTIFICATION_RATE_LIMITED"
            )
            info = error_info(error).metadata
            assert info["retry_time"] == (start + timedelta(hours=1)).isoformat()
            assert (info["contact_id"], info["limit"]) == (first.contact_id, "3")
            # Another contact has its own count; an admin token does not lift the limit.
            await n.send_test(second.contact_id, own)
            await expect_error(
                n.send_test(first.contact_id), EXHAUSTED, "TEST_NOTIFICATION_RATE_LIMITED"
            )
            # The refused calls wrote nothing.
            assert len(await n.notifications(ACCOUNT, [TEST])) == 4
            # Once the first send is an hour old, one more may go.
            await n.advance(timedelta(minutes=30))
            await n.send_test(first.contact_id, own)
            await expect_error(
                n.send_test(first.contact_id, own), EXHAUSTED, "TEST_NOTIFICATION_RATE_LIMITED"
            )
            assert len(await n.notifications(ACCOUNT, [TEST])) == 5


# --- request sizes -----------------------------------------------------------------------


async def test_batches_pages_messages_and_metadata_are_bounded(q):
    requests = [q.usage(f"evt-{i}") for i in range(1001)]
    await expect_error(q.batch(requests), INVALID, "INVALID_FIELD", "requests")

    await expect_error(
        q.stub.ListPackages(
            quota_service_pb2.ListPackagesRequest(account_id=ACCOUNT, page_size=-1),
            metadata=q.admin,
        ),
        INVALID,
        "INVALID_FIELD",
        "page_size",
    )
    # A huge page size is served (capped), not refused or failed.
    await q.stub.ListPackages(
        quota_service_pb2.ListPackagesRequest(account_id=ACCOUNT, page_size=2**31 - 1),
        metadata=q.admin,
    )

    huge = q.usage("evt-huge")
    huge.enterprise_project_id = "x" * (5 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await q.report_request(huge)
    assert caught.value.code() == EXHAUSTED

    padded = (*q.gateway, ("x-padding", "y" * (64 * 1024)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await q.report_request(q.usage("evt-padded"), padded)
    assert caught.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    assert caught.value.code() == EXHAUSTED, caught.value

    # The server is unharmed.
    assert (await q.report("evt-fine")).event_id == "evt-fine"
