"""The notification service for tests: as a real process (end-to-end), in-process on port 0
(service tests), and short calls to it.

`NotificationProcess` is `WatchedProcess` for `python -m services.notification`: every wait has a
deadline and the child gets exactly the `ALLOT_*` settings the test chose. `NotificationCalls`
wraps the real stub (and the manual clock's ClockService) with real tokens; `settled` polls
`ListNotifications` until the deliveries a test waits for are no longer pending, so a test never
sleeps for a guessed time, and `barrier` is what a check that nothing more was sent reads up
to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import grpc
from allot.notification.v1 import (
    notification_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
)
from allot.testing.v1 import clock_service_pb2_grpc
from google.protobuf import field_mask_pb2

from services.notification.service import NotificationService
from shared.server import Server, build_runtime
from shared.settings import Settings
from tests.support.calls import Metadata, ServiceCalls
from tests.support.processes import WatchedProcess
from tests.support.receivers import SmtpInbox
from tests.support.servers import METRICS_OFF_SETTINGS, TEST_SECRET, Tokens, free_port

# Numbers the barrier accounts and addresses of `NotificationCalls.barrier`.
_BARRIERS = itertools.count(1)

# Both manual clocks (quota's and notification's) start here in these tests.
CLOCK_START = "2024-01-01T00:00:00Z"
# How long a test waits for something the services do on their own (a delivery, a consumer
# catching up); generous for a loaded 2-core machine, and every wait ends as soon as it is met.
SETTLE_TIMEOUT = 30.0
POLL = 0.05

EMAIL = notification_pb2.CHANNEL_EMAIL
SMS = notification_pb2.CHANNEL_SMS
WEBHOOK = notification_pb2.CHANNEL_WEBHOOK

USAGE_ALERT = notification_pb2.MESSAGE_TYPE_USAGE_ALERT
PACKAGE_EXPIRING = notification_pb2.MESSAGE_TYPE_PACKAGE_EXPIRING
PACKAGE_EXHAUSTED = notification_pb2.MESSAGE_TYPE_PACKAGE_EXHAUSTED
ARREARS = notification_pb2.MESSAGE_TYPE_ARREARS
TEST = notification_pb2.MESSAGE_TYPE_TEST

PENDING = notification_pb2.DELIVERY_STATE_PENDING
SENT = notification_pb2.DELIVERY_STATE_SENT
FAILED = notification_pb2.DELIVERY_STATE_FAILED

Notification = notification_pb2.Notification
T = TypeVar("T")


# --- as a process ------------------------------------------------------------------------


def notification_env(
    database_url: str, data_dir: pathlib.Path, quota_addr: str, **extra: str
) -> dict[str, str]:
    """The settings of a notification process on a fresh loopback port, consuming the quota
    at `quota_addr` (every region), on a manual clock at CLOCK_START with a short lease."""
    env = {
        "ALLOT_NOTIFICATION_DATABASE_URL": database_url,
        "ALLOT_NOTIFICATION_ADDR": f"127.0.0.1:{free_port()}",
        "ALLOT_QUOTA_ADDR": quota_addr,
        # Not following billing unless a test says where it is: never a developer's suite.
        "ALLOT_BILLING_ADDR": "",
        "ALLOT_AUTH_SECRET": TEST_SECRET,
        "ALLOT_DATA_DIR": str(data_dir),
        "ALLOT_CLOCK": "manual",
        "ALLOT_CLOCK_START": CLOCK_START,
        "ALLOT_CONSUMER_LEASE_SECONDS": "2",
        "ALLOT_SHUTDOWN_GRACE_SECONDS": "2",
        # The tests' webhook receivers listen on 127.0.0.1, which production refuses.
        "ALLOT_WEBHOOK_ALLOW_PRIVATE": "true",
        # No probe of held-back deliveries unless a test asks: a test counts every attempt.
        "ALLOT_DELIVERY_PROBE_SECONDS": "0",
    }
    env.update(extra)
    return env


class NotificationProcess(WatchedProcess):
    """`python -m services.notification` with a deadline on every wait."""

    def __init__(self, env: dict[str, str], log_path: pathlib.Path) -> None:
        super().__init__("notification", env, log_path)


@contextlib.contextmanager
def notification_process(
    env: dict[str, str], log_path: pathlib.Path
) -> Iterator[NotificationProcess]:
    """A started notification process, killed on the way out if it still runs."""
    process = NotificationProcess(env, log_path)
    try:
        process.start()
        yield process
    finally:
        process.kill()


# --- in process --------------------------------------------------------------------------


def notification_settings(
    database_url: str, data_dir: pathlib.Path, quota_addr: str, **overrides: str
) -> Settings:
    values = {
        **METRICS_OFF_SETTINGS,
        "data_dir": str(data_dir),
        "notification_database_url": database_url,
        "notification_addr": "127.0.0.1:0",
        "quota_addr": quota_addr,
        "billing_addr": "",
        "auth_secret": TEST_SECRET,
        "shutdown_grace": "2",
        "clock": "manual",
        "clock_start": CLOCK_START,
        "consumer_lease_seconds": "2",
        # The tests' webhook receivers listen on 127.0.0.1, which production refuses.
        "webhook_allow_private": "true",
        # No probe of held-back deliveries unless a test asks: a test counts every attempt.
        "delivery_probe": "0",
    }
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


@dataclass
class NotificationHandle:
    server: Server
    channel: grpc.aio.Channel
    calls: NotificationCalls


@contextlib.asynccontextmanager
async def running_notification(settings: Settings):
    """An in-process notification server on a free loopback port, with calls to it."""
    runtime = build_runtime(settings, "notification")
    server = Server(
        runtime,
        NotificationService(runtime),
        settings.notification_addr,
        settings.notification_metrics_addr,
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.bound_addr)
    try:
        yield NotificationHandle(server, channel, NotificationCalls(channel))
    finally:
        await channel.close()
        await server.stop()


# --- calls -------------------------------------------------------------------------------


def contact(
    account_id: str,
    channel: int,
    address: str,
    message_types: Sequence[int] = (USAGE_ALERT,),
    contact_id: str = "",
) -> notification_pb2.Contact:
    return notification_pb2.Contact(
        contact_id=contact_id,
        account_id=account_id,
        channel=channel,
        address=address,
        message_types=list(message_types),
    )


def deliveries(notification: Notification) -> dict[str, tuple[int, int, int]]:
    """contact id -> (channel, state, attempts) of each delivery."""
    return {d.contact_id: (d.channel, d.state, d.attempts) for d in notification.deliveries}


@dataclass
class NotificationCalls(ServiceCalls):
    """One method per RPC of NotificationService (and ClockService), admin by default."""

    channel: grpc.aio.Channel
    tokens: Tokens = field(default_factory=Tokens)
    CLOCK_TIMEOUT = SETTLE_TIMEOUT

    def __post_init__(self) -> None:
        self.stub = notification_service_pb2_grpc.NotificationServiceStub(self.channel)
        self.clock = clock_service_pb2_grpc.ClockServiceStub(self.channel)
        self.admin = self.tokens.md(self.tokens.admin())

    # --- contacts ------------------------------------------------------------------------

    def create_contact(
        self,
        value: notification_pb2.Contact,
        request_id: str = "",
        metadata: Metadata | None = None,
    ) -> Awaitable[notification_pb2.Contact]:
        return self.stub.CreateContact(
            notification_service_pb2.CreateContactRequest(request_id=request_id, contact=value),
            metadata=metadata or self.admin,
        )

    async def create(
        self,
        account_id: str,
        channel: int,
        address: str,
        message_types: Sequence[int] = (USAGE_ALERT,),
        metadata: Metadata | None = None,
    ) -> notification_pb2.Contact:
        return await self.create_contact(
            contact(account_id, channel, address, message_types), metadata=metadata
        )

    def get_contact(self, contact_id: str, metadata: Metadata | None = None):
        return self.stub.GetContact(
            notification_service_pb2.GetContactRequest(contact_id=contact_id),
            metadata=metadata or self.admin,
        )

    def list_contacts(
        self,
        account_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.ListContacts(
            notification_service_pb2.ListContactsRequest(
                account_id=account_id, page_size=page_size, page_token=page_token
            ),
            metadata=metadata or self.admin,
        )

    def update_contact(
        self,
        value: notification_pb2.Contact,
        paths: Sequence[str] = (),
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.UpdateContact(
            notification_service_pb2.UpdateContactRequest(
                request_id=request_id,
                contact=value,
                update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            ),
            metadata=metadata or self.admin,
        )

    def delete_contact(self, contact_id: str, metadata: Metadata | None = None):
        return self.stub.DeleteContact(
            notification_service_pb2.DeleteContactRequest(contact_id=contact_id),
            metadata=metadata or self.admin,
        )

    # --- notifications -------------------------------------------------------------------

    def list_notifications(
        self,
        account_id: str = "",
        message_types: Sequence[int] = (),
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(
                account_id=account_id,
                message_types=list(message_types),
                page_size=page_size,
                page_token=page_token,
            ),
            metadata=metadata or self.admin,
        )

    async def notifications(
        self, account_id: str, message_types: Sequence[int] = (), page_size: int = 1000
    ) -> list[Notification]:
        """Every notification of the account (of `message_types`), newest first, all pages."""
        out: list[Notification] = []
        token = ""
        for _ in range(1000):  # bounded: each page moves the keyset forward
            page = await self.list_notifications(
                account_id, message_types, page_size=page_size, page_token=token
            )
            out.extend(page.notifications)
            token = page.next_page_token
            if not token:
                return out
        raise AssertionError("ListNotifications never ended")

    async def settled(
        self,
        account_id: str,
        count: int,
        message_types: Sequence[int] = (),
        done: Callable[[notification_pb2.Delivery], bool] = lambda d: d.state != PENDING,
        within: float = SETTLE_TIMEOUT,
    ) -> list[Notification]:
        """The account's notifications once there are `count` and every delivery is `done`
        (by default: no longer pending); an AssertionError with what there is otherwise."""
        return await until(
            lambda: self.notifications(account_id, message_types),
            lambda found: len(found) >= count and all(done(d) for n in found for d in n.deliveries),
            within,
            f"{count} settled notifications of {account_id}",
        )

    def watch(self, account_id: str = "", metadata: Metadata | None = None, timeout: float = 60):
        return self.stub.WatchNotifications(
            notification_service_pb2.WatchNotificationsRequest(account_id=account_id),
            metadata=metadata or self.admin,
            timeout=timeout,
        )

    def retry(self, notification_id: str, contact_id: str, metadata: Metadata | None = None):
        return self.stub.RetryDelivery(
            notification_service_pb2.RetryDeliveryRequest(
                notification_id=notification_id, contact_id=contact_id
            ),
            metadata=metadata or self.admin,
        )

    def send_test(self, contact_id: str, metadata: Metadata | None = None):
        return self.stub.SendTestNotification(
            notification_service_pb2.SendTestNotificationRequest(contact_id=contact_id),
            metadata=metadata or self.admin,
        )

    async def barrier(self, inbox: SmtpInbox) -> str:
        """A barrier for "nothing more was sent" (instead of a quiet pause): a test email to a
        fresh contact of a barrier account, sent now, has arrived and is SENT, and then
        AdvanceTime(0) has run every due delivery before returning. A delivery settled before
        is never claimed again (only PENDING ones are), and one still due has been tried by
        then, so what a receiver has not got now is not coming. Returns the barrier's address
        (its mail is in `inbox`)."""
        tag = next(_BARRIERS)
        account = f"acct-barrier-{tag}"
        address = f"barrier-{tag}@example.com"
        created = await self.create(account, EMAIL, address)
        await self.send_test(created.contact_id)
        await until(
            lambda: asyncio.sleep(0, [m for m in inbox.messages if address in m.rcpt_tos]),
            lambda found: len(found) == 1,
            what=f"the barrier mail to {address}",
        )
        await self.settled(account, 1)
        await self.advance(timedelta(0))
        return address


async def until(
    read: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    within: float = SETTLE_TIMEOUT,
    what: str = "the condition",
) -> T:
    """Read until `ok(value)`; the last value in an AssertionError after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within} s; last read: {value}")
        await asyncio.sleep(POLL)
