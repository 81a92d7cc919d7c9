"""Deliveries resume promptly when their channel comes back (docs/faults.md, "Deliveries"):
mail that failed while the SMTP server was down is not left to each delivery's next backoff
step; the first send that gets through wakes every email waiting behind the outage, and each
is sent exactly once. The service clock never moves in this test, so nothing is due by its
backoff: only the wake can send them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from allot.notification.v1 import notification_pb2
from sqlalchemy import select

from services.notification.adapters import tables
from services.notification.app import deliveries
from tests.support.notification import EMAIL, WEBHOOK, notification_settings, running_notification
from tests.support.receivers import closed_port, smtp_receiver

ACCOUNT = "acct-outage"
CONTACTS = 4
SENDS_PER_CONTACT = 2  # within SendTestNotification's limit of 3 per contact and hour
WAIT = 20.0
PENDING = notification_pb2.DELIVERY_STATE_PENDING
SENT = notification_pb2.DELIVERY_STATE_SENT


async def _deliveries(n) -> list[notification_pb2.Delivery]:
    return [d for x in await n.notifications(ACCOUNT) for d in x.deliveries]


def _settings(database_url: str, tmp_path, smtp_port: int):
    """Mail to `smtp_port`; a retry after an hour, far beyond these tests, whose clock never
    moves; no probe of its own."""
    return notification_settings(
        database_url,
        tmp_path,
        "127.0.0.1:1",  # no quota: these tests make their own notifications
        smtp_url=f"smtp://127.0.0.1:{smtp_port}",
        delivery_backoff="3600",
        delivery_probe="0",
    )


def _all_failed_once(n, count: int):
    """A check for `_until`: the `count` deliveries, each pending after one failed attempt."""

    async def check():
        found = await _deliveries(n)
        done = len(found) == count and all(d.state == PENDING and d.attempts == 1 for d in found)
        return found if done else None

    return check


async def _due_times(ctx) -> set[tuple[str, str, int]]:
    """Each delivery's next retry, as stored (the API does not show it)."""
    d = tables.deliveries.c
    query = select(d.notification_id, d.contact_id, d.due_time_us)
    return {tuple(r) for r in await ctx.db.read(lambda uow: uow.rows(query))}


async def _until(check, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {what} within {WAIT} s")


async def test_mail_held_back_by_an_smtp_outage_goes_out_on_the_first_success(
    database_url, tmp_path
):
    port = closed_port()
    # No probe either: only the new message can find the server back.
    settings = _settings(database_url, tmp_path, port)
    async with running_notification(settings) as handle:
        n = handle.calls
        contacts = [await n.create(ACCOUNT, EMAIL, f"ops{i}@example.com") for i in range(CONTACTS)]
        for contact in contacts:
            for _ in range(SENDS_PER_CONTACT):
                await n.send_test(contact.contact_id)
        held = CONTACTS * SENDS_PER_CONTACT

        for delivery in await _until(_all_failed_once(n, held), "first attempts refused"):
            assert "Connect call failed" in delivery.last_error, delivery.last_error

        with smtp_receiver(port=port) as inbox:
            # The SMTP server is back. One new message gets through and wakes the rest.
            fresh = await n.create(ACCOUNT, EMAIL, "new@example.com")
            await n.send_test(fresh.contact_id)

            async def all_sent():
                found = await _deliveries(n)
                return found if all(d.state == SENT for d in found) else None

            sent = await _until(all_sent, "delivery of every held-back mail")
            assert len(sent) == held + 1
            assert {d.attempts for d in sent} <= {1, 2}
            barrier = await n.barrier(inbox)  # a second send of anything has landed by now
            ids = Counter(
                m.message["Message-ID"] for m in inbox.messages if m.rcpt_tos != [barrier]
            )
            assert len(ids) == held + 1 and set(ids.values()) == {1}, ids


async def test_a_probe_tries_the_earliest_held_back_delivery_of_each_channel_uncounted(
    database_url, tmp_path, caplog
):
    """`probe_held_back` (run every ALLOT_DELIVERY_PROBE_SECONDS; called directly here) tries
    one held-back email (the earliest due) and one held-back webhook per contact; a failed
    probe leaves attempts and the next retry as they were; a probe that gets through is sent
    and wakes the mail behind it."""
    caplog.set_level(logging.INFO, logger="allot.notification")
    port = closed_port()
    settings = _settings(database_url, tmp_path, port)  # the test runs the probe itself
    async with running_notification(settings) as handle:
        n = handle.calls
        service = handle.server.service
        first = await n.create(ACCOUNT, EMAIL, "first@example.com")
        second = await n.create(ACCOUNT, EMAIL, "second@example.com")
        hooks = [
            await n.create(ACCOUNT, WEBHOOK, f"http://127.0.0.1:{closed_port()}/hook{i}")
            for i in range(2)
        ]
        for contact in (first, second, hooks[0], hooks[0], hooks[1]):
            await n.send_test(contact.contact_id)

        await _until(_all_failed_once(n, 5), "first attempts refused")
        before = await _due_times(service.context)
        caplog.clear()
        assert await deliveries.probe_held_back(service.context) == 0
        probed = [r.getMessage() for r in caplog.records if "probe of delivery" in r.getMessage()]
        assert len(probed) == 3, probed
        # The email probed is the one whose retry is due first (backoff has jitter).
        mail = [r for r in before if r[1] in (first.contact_id, second.contact_id)]
        earliest = min(mail, key=lambda r: r[2])
        later = max(mail, key=lambda r: r[2])
        assert sum(f"{earliest[0]} to {earliest[1]}" in m for m in probed) == 1, probed
        assert not any(later[1] in m for m in probed)
        assert all(sum(h.contact_id in m for m in probed) == 1 for h in hooks)
        assert await _due_times(service.context) == before
        assert {(d.state, d.attempts) for d in await _deliveries(n)} == {(PENDING, 1)}

        with smtp_receiver(port=port) as inbox:
            assert await deliveries.probe_held_back(service.context) == 1
            service.kick()  # as the service does after a probe got through

            async def mail_sent():
                found = await _deliveries(n)
                mail = [d for d in found if d.channel == EMAIL]
                return found if all(d.state == SENT for d in mail) else None

            found = await _until(mail_sent, "the woken mail")
            barrier = await n.barrier(inbox)  # a second send of anything has landed by now
            assert len([m for m in inbox.messages if m.rcpt_tos != [barrier]]) == 2
        assert {(d.channel, d.state, d.attempts) for d in found} == {
            (EMAIL, SENT, 2),
            (WEBHOOK, PENDING, 1),
        }
