"""The production due-work loop: services on the system clock, nobody moving any clock.

Every other test runs the manual clock, on which `Scheduler.start` does nothing and due work
runs only inside a ClockService call. Here quota, billing and notification run with
ALLOT_CLOCK=system and ALLOT_DUE_WORK_INTERVAL_SECONDS=1, and the test only waits (bounded):

- a package granted to expire a few seconds from now is announced EXPIRED by quota;
- pay-per-use reported in the current hourly cycle is settled once the cycle ends. Cycles are
  hours on the billing time zone's clock, so billing runs on a zone (a real TZif file, found
  through the zoneinfo search path) whose offset puts the end of the hour ~20 s from now: the
  real scheduler crosses a real cycle boundary. The usage is in billing before the boundary,
  so no "late usage" nudge settles it — only the scheduler's pass after the boundary can;
- a webhook delivery answered 503 is retried after ALLOT_DELIVERY_BACKOFF_SECONDS=1.

With `Scheduler.start` returning early (the manual clock's behaviour) none of the three happens
and the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import zoneinfo
from datetime import UTC, datetime, timedelta

from allot.billing.v1 import billing_pb2
from allot.notification.v1 import notification_pb2
from allot.quota.v1 import quota_pb2

from tests.support.billing import billing_settings, micros, running_billing
from tests.support.events import events
from tests.support.notification import WEBHOOK, notification_settings, running_notification, until
from tests.support.quota import QuotaCalls, last_event_sequence, quota_settings, running_quota
from tests.support.receivers import http_receiver

REGION = "ap-southeast-1"
API = "passport"
# Seconds from billing's start to the end of its current cycle: time to start billing, report
# the usage and see billing take it in, on a loaded machine.
TO_BOUNDARY = 20
WITHIN = 30.0
SYSTEM = {"clock": "system", "due_work_interval": "1"}


def tzif(offset_seconds: int, name: bytes = b"TST") -> bytes:
    """A TZif (version 2) file for a fixed UTC offset: no transitions, one local time type,
    and the POSIX TZ footer that readers use for every instant."""
    abbreviation = name + b"\0"

    def block() -> bytes:
        counts = struct.pack(">6l", 0, 0, 0, 0, 1, len(abbreviation))
        return b"TZif2" + b"\0" * 15 + counts + struct.pack(">lBB", offset_seconds, 0, 0)

    sign = "-" if offset_seconds >= 0 else "+"  # POSIX counts west of Greenwich positive
    size = abs(offset_seconds)
    footer = f"\n<{name.decode()}>{sign}{size // 3600}:{size % 3600 // 60:02d}:{size % 60:02d}\n"
    return (block() + abbreviation) * 2 + footer.encode()


@contextlib.contextmanager
def zone_with_hour_ending_at(boundary: datetime, directory):
    """The key of a time zone on whose clock an hour ends at `boundary`, findable by
    `zoneinfo.ZoneInfo` while the context lasts."""
    offset = -int(boundary.timestamp()) % 3600
    key = f"AllotTest/HourEndsAt{int(boundary.timestamp())}"
    path = directory / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tzif(offset))
    before = zoneinfo.TZPATH
    zoneinfo.reset_tzpath(to=[str(directory), *before])
    try:
        assert boundary.astimezone(zoneinfo.ZoneInfo(key)).minute == 0
        yield key
    finally:
        zoneinfo.reset_tzpath(to=before)


async def quota_events(quota: QuotaCalls, types: list[str]) -> list[quota_pb2.QuotaEvent]:
    """Quota's events of `types` written so far (a read that waits for none)."""
    return await events(quota.stub, quota.admin, types=types, within=WITHIN)


async def test_due_work_runs_on_the_system_clock_without_any_clock_call(tmp_path):
    settings_q = quota_settings(f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}", tmp_path, **SYSTEM)
    async with contextlib.AsyncExitStack() as stack:
        quota = QuotaCalls(await stack.enter_async_context(running_quota(settings_q)))
        receiver = stack.enter_context(http_receiver((503, 200)))
        notification = (
            await stack.enter_async_context(
                running_notification(
                    notification_settings(
                        f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
                        tmp_path,
                        quota.handle.addr,
                        delivery_backoff="1",
                        delivery_backoff_factor="1",
                        **SYSTEM,
                    )
                )
            )
        ).calls

        # An expiry: a package that ends three seconds from now.
        now = datetime.now(UTC).replace(microsecond=0)
        package = await quota.grant(
            "acct-expiry",
            5,
            effective=now - timedelta(minutes=1),
            expire=now + timedelta(seconds=3),
        )

        # A delivery retry: the webhook answers 503 first.
        hook = await notification.create(
            "acct-hook",
            WEBHOOK,
            receiver.url(),
            (notification_pb2.MESSAGE_TYPE_USAGE_ALERT,),
        )
        sent = await notification.send_test(hook.contact_id)

        # Settlement: billing on a zone whose hour ends TO_BOUNDARY seconds from now.
        boundary = datetime.fromtimestamp(int(time.time()) + TO_BOUNDARY, UTC)
        zone = stack.enter_context(zone_with_hour_ending_at(boundary, tmp_path / "zones"))
        billing_handle = await stack.enter_async_context(
            running_billing(
                billing_settings(
                    f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
                    tmp_path,
                    quota.handle.addr,
                    "",
                    timezone=zone,
                    **SYSTEM,
                )
            )
        )
        billing = billing_handle.calls
        await billing.create_account("acct-ppu")
        await quota.enable("acct-ppu", API, REGION, request_id="enable-ppu")
        usage = await quota.report("ppu-1", "acct-ppu", 40)
        assert usage.pay_per_use_quantity == 40
        last = await last_event_sequence(quota.handle, "pay_per_use_recorded")
        await billing_handle.caught_up(last, quota.handle.addr, within=WITHIN)
        assert datetime.now(UTC) < boundary, (
            "billing took the usage in after its cycle ended: the late-usage nudge, not the "
            "scheduler, would settle it; raise TO_BOUNDARY"
        )
        assert micros((await billing.get_account("acct-ppu")).balance) == 0

        # Nobody moves a clock from here on: only the scheduler's loop can do any of this.
        # The three waits run together, so a failure names every one that did not happen.
        expired, delivered, settled = await asyncio.gather(
            until(
                lambda: quota_events(quota, ["package_state_changed"]),
                lambda found: any(
                    e.package_state_changed.package.package_id == package.package_id
                    and e.package_state_changed.package.state == quota_pb2.PACKAGE_STATE_EXPIRED
                    for e in found
                ),
                WITHIN,
                f"EXPIRED announcement of {package.package_id}",
            ),
            until(
                lambda: notification.notifications("acct-hook"),
                lambda found: any(
                    n.notification_id == sent.notification_id
                    and all(d.state == notification_pb2.DELIVERY_STATE_SENT for d in n.deliveries)
                    for n in found
                ),
                WITHIN,
                "webhook delivery retried and sent",
            ),
            until(
                lambda: billing.get_account("acct-ppu"),
                lambda account: micros(account.balance) < 0,
                TO_BOUNDARY + WITHIN,
                "pay-per-use cycle settled after it ended",
            ),
            return_exceptions=True,
        )
        missing = [r for r in (expired, delivered, settled) if isinstance(r, BaseException)]
        assert not missing, "\n".join(str(r) for r in missing)
        assert [r.status for r in receiver.requests] == [503, 200]
        assert datetime.now(UTC) >= boundary
        assert settled.standing == billing_pb2.ACCOUNT_STANDING_GRACE
        assert micros(settled.balance) == -100_000  # 40 calls at USD 0.0025
