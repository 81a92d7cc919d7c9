"""SMTP down, then up, end to end: quota and notification as processes (notification on
PostgreSQL), one email contact subscribed to usage alerts, 20 usage-alert crossings while
nothing listens on the SMTP port, then an SMTP server started on that port.

Notification runs with the default retry settings (first retry after 60 s, factor 3, eight
attempts) on a manual clock that the test never moves: no retry ever comes due and no new
notification comes after the server is back, so the only way out is the probe
(ALLOT_DELIVERY_PROBE_SECONDS, lowered to PROBE_SECONDS here; docs/faults.md "Deliveries").
While the port is closed the probes fail and are not counted: every delivery keeps its one
failed attempt. Once the server is up, every notification reaches the inbox exactly once (one
Message-ID per notification, none twice) within PROBE_SECONDS plus SEND_WITHIN, and every
delivery is SENT after two attempts. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.support.events import AlertCalls
from tests.support.notification import (
    CLOCK_START,
    EMAIL,
    PENDING,
    SENT,
    USAGE_ALERT,
    NotificationCalls,
    notification_env,
    notification_process,
    until,
)
from tests.support.quota import API, quota_calls, quota_env, quota_process
from tests.support.receivers import closed_port, smtp_receiver

ACCOUNT = "acct-smtp-down"
ADDRESS = "ops@example.com"
CROSSINGS = 20
PROBE_SECONDS = 2
# After the server is up and the next probe has run: one round sends the 20 mails.
SEND_WITHIN = 20.0
# After the last expected mail, how long nothing more may arrive.
QUIET = 1.0
FAILED_PROBES = 2


# PostgreSQL only (skipped where it is unreachable, except under CI=true).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_mail_held_back_by_a_dead_smtp_server_goes_out_once_within_the_probe_bound(
    database_url, tmp_path
):
    port = closed_port()
    quota_dir, notification_dir = tmp_path / "quota", tmp_path / "notification"
    quota_dir.mkdir()
    notification_dir.mkdir()
    q_env = quota_env(
        f"sqlite+aiosqlite:///{quota_dir / 'quota.db'}",
        quota_dir,
        ALLOT_CLOCK="manual",
        ALLOT_CLOCK_START=CLOCK_START,
    )
    with quota_process(q_env, tmp_path / "quota.log") as quota:
        n_env = notification_env(
            database_url,
            notification_dir,
            quota.addr,
            ALLOT_SMTP_URL=f"smtp://127.0.0.1:{port}",
            ALLOT_DELIVERY_PROBE_SECONDS=str(PROBE_SECONDS),
        )
        log_path = tmp_path / "notification.log"
        with notification_process(n_env, log_path) as notification:
            async with (
                grpc.aio.insecure_channel(quota.addr) as quota_channel,
                grpc.aio.insecure_channel(notification.addr) as notification_channel,
            ):
                q = quota_calls(quota_channel)
                n = NotificationCalls(notification_channel)
                await n.create(ACCOUNT, EMAIL, ADDRESS)
                # One 100-call package and 20 alerts at 99..80 calls left: each call crosses one.
                await q.grant(ACCOUNT, 100)
                alerts = AlertCalls(q)
                for left in range(100 - CROSSINGS, 100):
                    await alerts.create(ACCOUNT, api=API, quantity=left)
                for i in range(CROSSINGS):
                    assert (await q.report(f"use-{i}", ACCOUNT, 1)).remaining_quantity == 99 - i

                # Every delivery tried once and held back; the probes fail and are not counted.
                await n.settled(
                    ACCOUNT, CROSSINGS, [USAGE_ALERT], done=lambda d: d.attempts >= 1, within=60
                )
                await until(
                    lambda: asyncio.to_thread(notification.log_text),
                    lambda text: text.count("probe of delivery") >= FAILED_PROBES,
                    within=PROBE_SECONDS * FAILED_PROBES + 30,
                    what=f"{FAILED_PROBES} failed probes",
                )
                held = await n.notifications(ACCOUNT, [USAGE_ALERT])
                assert len(held) == CROSSINGS
                assert {(d.state, d.attempts) for x in held for d in x.deliveries} == {
                    (PENDING, 1)
                }, held

                with smtp_receiver(port=port) as inbox:
                    up = time.monotonic()
                    mails = await inbox.wait_for(CROSSINGS, within=PROBE_SECONDS + SEND_WITHIN)
                    took = time.monotonic() - up
                    await asyncio.sleep(QUIET)
                    mails = inbox.messages
                    sent = await n.settled(ACCOUNT, CROSSINGS, [USAGE_ALERT])
                print(f"\n{len(mails)} mails within {took:.1f} s of the SMTP server coming up")

                # Exactly one email per notification: one Message-ID each, none twice.
                assert len(mails) == CROSSINGS
                assert all(m.rcpt_tos == [ADDRESS] for m in mails)
                ids = [m.message["Message-ID"] for m in mails]
                assert len(set(ids)) == CROSSINGS, ids
                notification_ids = {x.notification_id for x in sent}
                assert len(notification_ids) == CROSSINGS
                for x in sent:
                    assert sum(x.notification_id in i for i in ids) == 1, (x.notification_id, ids)
                assert {(d.state, d.attempts) for x in sent for d in x.deliveries} == {(SENT, 2)}

            assert notification.terminate(timeout=20) == 0
        assert quota.terminate(timeout=20) == 0
