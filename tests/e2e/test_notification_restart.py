"""Notification SIGKILLed while crossings arrive, and restarted: every crossing still yields
exactly one notification with exactly one delivery per subscribed contact
(docs/design/notification.md: "each relevant event becomes exactly one notification"; a consumer
that crashes and replays adds nothing).

Quota runs as a process (SQLite, manual clock). Each of ACCOUNTS accounts has a 20 % usage
alert and goes through CYCLES crossings: use 80 calls (the alert fires), grant 100 more (it
re-arms), again. A producer thread reports them at a steady pace while notification (a process
on SQLite or PostgreSQL, a short consumer lease) is SIGKILLed at random points of its progress
KILLS times and started again, each time a new replica waiting out the dead one's lease. Each
account has an email contact (to a real SMTP server) and a webhook contact (to a real HTTP
receiver), both subscribed to usage alerts.

At the end, quota's `WatchEvents` is the truth: for every account the `source_event_id`s of its
usage-alert notifications are exactly its `threshold_crossed` event ids (none lost, none twice),
each with one delivery per contact, all SENT once the claims of sends cut short by a kill have
ended (wall clock, ALLOT_DELIVERY_CLAIM_SECONDS) and notification's clock moves. A send cut
short may reach a receiver twice (receivers de-duplicate on the notification id), so receivers
must have seen every notification, not exactly once.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import grpc
from allot.quota.v1 import quota_service_pb2, quota_service_pb2_grpc

from tests.support.databases import (
    DirectReader,
)
from tests.support.events import THRESHOLD_CROSSED, events
from tests.support.notification import (
    CLOCK_START,
    EMAIL,
    SENT,
    USAGE_ALERT,
    WEBHOOK,
    NotificationCalls,
    NotificationProcess,
    notification_env,
    until,
)
from tests.support.processes import grown_to
from tests.support.quota import API, END_OF_YEAR, REGION, QuotaCalls, quota_env, quota_process
from tests.support.receivers import http_receiver, smtp_receiver
from tests.support.servers import Tokens

ACCOUNTS = 12
CYCLES = 3
CROSSINGS = ACCOUNTS * CYCLES
KILLS = 3
# Pauses between the producer's calls: the crossings keep arriving across the kills.
PACE = (0.03, 0.12)
# Each webhook answer takes this long, so a kill often lands while sends are in flight.
RECEIVER_DELAY = 0.05
# The wall-clock claim a delivery being sent holds (short here: the receivers answer at once).
CLAIM_SECONDS = 2
PROGRESS_TIMEOUT = 60.0
# Once everything is produced, a kill waits this long for progress, then goes anyway: longer
# than a restarted replica waits for the dead one's lease (ALLOT_CONSUMER_LEASE_SECONDS=2).
STILL = 4.0
FINISH_TIMEOUT = 60.0

TOKENS = Tokens()
ADMIN = TOKENS.md(TOKENS.admin())
GATEWAY = TOKENS.md(TOKENS.gateway())


def account_ids() -> list[str]:
    return [f"acct-kill-{i:02d}" for i in range(ACCOUNTS)]


class Producer(threading.Thread):
    """Sets up each account (a 100-call package, a 20 % alert), then runs CYCLES crossings per
    account, interleaving accounts: report 80 calls (20 % left: the alert fires), then grant
    100 more (the alert re-arms). Uses its own synchronous channel; errors are kept."""

    def __init__(self, quota_addr: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.quota_addr = quota_addr
        self.rng = random.Random(seed)
        self.error: BaseException | None = None
        self.crossings = 0

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.quota_addr) as channel:
                self._produce(quota_service_pb2_grpc.QuotaServiceStub(channel))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _grant(self, stub, account: str) -> None:
        package = QuotaCalls.package(account, 100, expire=END_OF_YEAR)
        stub.GrantPackage(
            quota_service_pb2.GrantPackageRequest(package=package), metadata=ADMIN, timeout=30
        )

    def _produce(self, stub) -> None:
        for account in account_ids():
            self._grant(stub, account)
            alert = quota_service_pb2.CreateUsageAlertRequest(
                usage_alert={
                    "account_id": account,
                    "region": REGION,
                    "api": API,
                    "enabled": True,
                    "remaining_percent": 20,
                }
            )
            stub.CreateUsageAlert(alert, metadata=ADMIN, timeout=30)
        for cycle in range(CYCLES):
            for account in account_ids():
                if cycle:
                    self._grant(stub, account)  # re-arms: 100·cycle + 20 > 20 % of the total
                    time.sleep(self.rng.uniform(*PACE))
                usage = QuotaCalls.usage(f"{account}-c{cycle}", account, 80)
                response = stub.ReportUsage(usage, metadata=GATEWAY, timeout=30)
                # 20 % of the total left: exactly at the threshold.
                assert response.remaining_quantity == 20 * (cycle + 1), response
                self.crossings += 1
                time.sleep(self.rng.uniform(*PACE))


class NotificationCount(DirectReader):
    """How many notifications notification's database holds (read directly, either dialect);
    0 before the first process ran its migrations, any query error raised."""

    async def count(self) -> int:
        return await self.scalar_once("notifications", "SELECT count(*) FROM notifications")

    async def wait(
        self, at_least: int, within: float, finished: Callable[[], bool] = lambda: False
    ) -> int:
        """Until `at_least` notifications exist, or, once `finished()` (nothing more will
        come), the count has not moved for STILL seconds."""
        return await grown_to(self.count, at_least, within, finished, STILL, "notifications")


async def test_killed_and_restarted_notification_notifies_every_crossing_exactly_once(
    service_url, seed, tmp_path
):
    rng = random.Random(seed)
    db = NotificationCount(service_url)
    quota_data = tmp_path / "quota"
    quota_data.mkdir()
    q_env = quota_env(
        f"sqlite+aiosqlite:///{quota_data / 'quota.db'}",
        quota_data,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
    )
    with (
        quota_process(q_env, tmp_path / "quota.log") as quota,
        smtp_receiver() as smtp,
        http_receiver(delay=RECEIVER_DELAY) as hooks,
    ):
        env = notification_env(
            service_url,
            tmp_path,
            quota.addr,
            ALLOT_SMTP_URL=smtp.url(),
            ALLOT_DELIVERY_CLAIM_SECONDS=str(CLAIM_SECONDS),
        )
        processes: list[NotificationProcess] = []

        def start(n: int) -> NotificationProcess:
            process = NotificationProcess(env, tmp_path / f"notification-{n}.log")
            processes.append(process)
            process.start()
            return process

        try:
            first = start(0)
            contacts: dict[str, set[str]] = {}
            async with grpc.aio.insecure_channel(first.addr) as channel:
                n = NotificationCalls(channel)
                for account in account_ids():
                    mail = await n.create(account, EMAIL, f"{account}@example.com")
                    hook = await n.create(account, WEBHOOK, hooks.url(f"/{account}"))
                    contacts[account] = {mail.contact_id, hook.contact_id}

            producer = Producer(quota.addr, seed)
            producer.start()
            # Kill after a random amount of progress each time (sorted, and always some progress
            # since the last restart), a few milliseconds later so the kill lands anywhere in
            # intake or delivery.
            thresholds = sorted(rng.sample(range(3, CROSSINGS - 3), KILLS))
            counts_at_kill = [0]
            current = first
            for k, threshold in enumerate(thresholds, start=1):
                await db.wait(
                    max(threshold, counts_at_kill[-1] + 1),
                    PROGRESS_TIMEOUT,
                    finished=lambda: not producer.is_alive(),
                )
                await asyncio.sleep(rng.uniform(0, 0.05))
                current.kill()  # SIGKILL
                counts_at_kill.append(await db.count())
                current = start(k)
            producer.join(PROGRESS_TIMEOUT)
            assert not producer.is_alive(), "the producer did not finish"
            assert producer.error is None, f"producer failed: {producer.error!r}"
            assert producer.crossings == CROSSINGS

            # Quota's stream is the truth: every crossing, by account.
            async with grpc.aio.insecure_channel(quota.addr) as quota_channel:
                stub = quota_service_pb2_grpc.QuotaServiceStub(quota_channel)
                crossed = await events(stub, ADMIN, 0, [THRESHOLD_CROSSED], at_least=CROSSINGS)
            expected: dict[str, set[str]] = {a: set() for a in account_ids()}
            for event in crossed:
                expected[event.threshold_crossed.account_id].add(event.event_id)
            assert {a: len(ids) for a, ids in expected.items()} == dict.fromkeys(
                account_ids(), CYCLES
            ), f"quota's stream (seed {seed})"

            async with grpc.aio.insecure_channel(current.addr) as channel:
                n = NotificationCalls(channel)

                async def all_notifications():
                    return {a: await n.notifications(a, [USAGE_ALERT]) for a in account_ids()}

                await until(
                    all_notifications,
                    lambda found: sum(map(len, found.values())) >= CROSSINGS,
                    FINISH_TIMEOUT,
                    f"{CROSSINGS} notifications (seed {seed})",
                )
                # Sends cut short by a kill stay claimed for CLAIM_SECONDS of wall time; then
                # moving notification's clock runs the due deliveries again.
                await asyncio.sleep(CLAIM_SECONDS + 0.5)
                await n.advance(timedelta(minutes=1))
                found = await until(
                    all_notifications,
                    lambda found: all(
                        d.state == SENT for ns in found.values() for x in ns for d in x.deliveries
                    ),
                    FINISH_TIMEOUT,
                    f"every delivery SENT (seed {seed})",
                )
            await asyncio.sleep(0.5)  # anything made twice would land now
            async with grpc.aio.insecure_channel(current.addr) as channel:
                n = NotificationCalls(channel)
                found = {a: await n.notifications(a, [USAGE_ALERT]) for a in account_ids()}
        finally:
            for process in processes:
                process.kill()
            await db.engine.dispose()

        assert len(processes) == KILLS + 1
        assert counts_at_kill == sorted(counts_at_kill), counts_at_kill
        for account in account_ids():
            sources = Counter(x.source_event_id for x in found[account])
            doubled = {s: c for s, c in sources.items() if c > 1}
            assert not doubled, f"{account}: notified twice for {doubled} (seed {seed})"
            assert set(sources) == expected[account], f"{account}: lost or foreign (seed {seed})"
            for notification in found[account]:
                assert notification.account_id == account
                assert {d.contact_id for d in notification.deliveries} == contacts[account]
                assert len(notification.deliveries) == 2
                assert all(d.state == SENT for d in notification.deliveries)
        # Every notification reached both receivers at least once (a send cut short by a kill
        # may have been repeated; receivers de-duplicate on the id).
        ids = {x.notification_id for ns in found.values() for x in ns}
        assert len(ids) == CROSSINGS
        by_hook = {r.headers["allot-notification-id"] for r in hooks.requests}
        by_mail = {m.message["X-Allot-Notification-Id"] for m in smtp.messages}
        assert ids <= by_hook, f"webhooks never received {sorted(ids - by_hook)} (seed {seed})"
        assert ids <= by_mail, f"emails never received {sorted(ids - by_mail)} (seed {seed})"
