"""Reading quota's event stream (`WatchEvents`) in tests, always bounded in time and size.

`WatchEvents` streams history and then stays open for live events, so a test cannot read "to
the end". `events()` reads what is there: it waits (up to `within` seconds) until `at_least`
events of the wanted types have arrived, then keeps reading until no further event comes for
`idle` seconds, and cancels the stream. Asking for the `at_least` events a test expects keeps
a slow machine from turning a late first event into a false failure; the idle window
afterwards is what catches an event too many.

`EventLog` keeps a cursor, so a test can ask "what was written since my last look?" around
each call, and the helpers below turn events into their payloads and (package id, state) rows
for compact assertions. Usage-alert calls (which `QuotaCalls` does not wrap) are here too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import grpc
from allot.quota.v1 import quota_pb2, quota_service_pb2
from google.protobuf import field_mask_pb2

from tests.support.quota_calls import ACCOUNT, REGION, Metadata, QuotaCalls

# Quiet time after the last event before the stream is taken to have nothing more.
IDLE = 0.3
# The longest one read may take, whatever comes.
TIMEOUT = 15.0
# A read never collects more than this many events.
MAX_EVENTS = 20_000

ARMED = quota_pb2.USAGE_ALERT_STATE_ARMED
FIRED = quota_pb2.USAGE_ALERT_STATE_FIRED

THRESHOLD_CROSSED = "threshold_crossed"
PAY_PER_USE_RECORDED = "pay_per_use_recorded"
PACKAGE_STATE_CHANGED = "package_state_changed"
PACKAGE_EXPIRING = "package_expiring"


async def events(
    stub,
    metadata: Metadata,
    after: int = 0,
    types: Sequence[str] = (),
    *,
    at_least: int = 0,
    idle: float = IDLE,
    within: float = TIMEOUT,
    limit: int = MAX_EVENTS,
) -> list[quota_pb2.QuotaEvent]:
    """The events after sequence `after` (of `types`; empty = all), as far as they arrive.

    Waits for `at_least` events (up to `within` seconds), then until `idle` seconds pass
    without one. Fewer than `at_least` after `within` are returned as they are: the caller's
    assertion says more than a timeout error would."""
    request = quota_service_pb2.WatchEventsRequest(after_sequence=after, event_types=list(types))
    call = stub.WatchEvents(request, metadata=metadata, timeout=within + 5)
    received: list[quota_pb2.QuotaEvent] = []
    deadline = time.monotonic() + within
    try:
        while len(received) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = left if len(received) < at_least else min(idle, left)
            try:
                event = await asyncio.wait_for(call.read(), wait)
            except TimeoutError:
                break
            if event is grpc.aio.EOF:
                break
            received.append(event)
    finally:
        call.cancel()
    return received


def payloads(items: Iterable[quota_pb2.QuotaEvent], event_type: str) -> list:
    """The payloads of the events of one type, in sequence order."""
    return [getattr(e, event_type) for e in items if e.WhichOneof("payload") == event_type]


def crossings(items: Iterable[quota_pb2.QuotaEvent]) -> list[tuple[str, str, int, int]]:
    """(alert_id, api, remaining_quantity, total_quantity) of each threshold_crossed event."""
    return [
        (p.alert_id, p.api, p.remaining_quantity, p.total_quantity)
        for p in payloads(items, THRESHOLD_CROSSED)
    ]


def state_changes(items: Iterable[quota_pb2.QuotaEvent]) -> list[tuple[str, int, int]]:
    """(package_id, previous_state, new state) of each package_state_changed event."""
    return [
        (p.package.package_id, p.previous_state, p.package.state)
        for p in payloads(items, PACKAGE_STATE_CHANGED)
    ]


class EventLog:
    """Quota's event stream read piece by piece: `new()` returns what came since last time."""

    def __init__(self, stub, metadata: Metadata) -> None:
        self.stub = stub
        self.metadata = metadata
        self.cursor = 0
        self.seen: list[quota_pb2.QuotaEvent] = []

    async def new(self, at_least: int = 0, of_type: str | None = None) -> list:
        """Events written since the last call (every type; the cursor moves past them all).

        `at_least` counts events of `of_type` (any type when None) to wait for."""
        fresh: list[quota_pb2.QuotaEvent] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = await events(self.stub, self.metadata, self.cursor, idle=IDLE)
            fresh.extend(got)
            if got:
                self.cursor = got[-1].sequence
            matching = [e for e in fresh if of_type is None or e.WhichOneof("payload") == of_type]
            if len(matching) >= at_least or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self.seen.extend(fresh)
        return fresh

    async def new_crossings(self, at_least: int = 0) -> list[tuple[str, str, int, int]]:
        return crossings(await self.new(at_least, THRESHOLD_CROSSED))


# --- usage alert calls -------------------------------------------------------------------


def alert(
    account_id: str = ACCOUNT,
    *,
    region: str = REGION,
    api: str = "",
    quantity: int | None = None,
    percent: float | None = None,
    enabled: bool = True,
) -> quota_pb2.UsageAlert:
    """A UsageAlert with the threshold given (neither: no threshold at all)."""
    message = quota_pb2.UsageAlert(account_id=account_id, region=region, api=api, enabled=enabled)
    if quantity is not None:
        message.remaining_quantity = quantity
    if percent is not None:
        message.remaining_percent = percent
    return message


class AlertCalls:
    """The usage alert RPCs and WatchEvents of a quota server, beside `QuotaCalls`."""

    def __init__(self, q: QuotaCalls) -> None:
        self.q = q
        self.stub = q.stub
        self.log = EventLog(q.stub, q.admin)

    def create_alert(
        self,
        usage_alert: quota_pb2.UsageAlert,
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.CreateUsageAlert(
            quota_service_pb2.CreateUsageAlertRequest(
                request_id=request_id, usage_alert=usage_alert
            ),
            metadata=metadata or self.q.admin,
        )

    async def create(self, account_id: str = ACCOUNT, **fields) -> quota_pb2.UsageAlert:
        """Create an alert built by `alert()` (keyword `metadata` picks the caller)."""
        metadata = fields.pop("metadata", None)
        return await self.create_alert(alert(account_id, **fields), metadata=metadata)

    def get_alert(self, alert_id: str, metadata: Metadata | None = None):
        return self.stub.GetUsageAlert(
            quota_service_pb2.GetUsageAlertRequest(alert_id=alert_id),
            metadata=metadata or self.q.admin,
        )

    async def state(self, alert_id: str) -> int:
        return (await self.get_alert(alert_id)).state

    def list_alerts(
        self,
        account_id: str = ACCOUNT,
        *,
        region: str = "",
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.ListUsageAlerts(
            quota_service_pb2.ListUsageAlertsRequest(
                account_id=account_id, region=region, page_size=page_size, page_token=page_token
            ),
            metadata=metadata or self.q.admin,
        )

    def update_alert(
        self,
        usage_alert: quota_pb2.UsageAlert,
        paths: Sequence[str] = (),
        request_id: str = "",
        metadata: Metadata | None = None,
    ):
        return self.stub.UpdateUsageAlert(
            quota_service_pb2.UpdateUsageAlertRequest(
                request_id=request_id,
                usage_alert=usage_alert,
                update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            ),
            metadata=metadata or self.q.admin,
        )

    def delete_alert(self, alert_id: str, metadata: Metadata | None = None):
        return self.stub.DeleteUsageAlert(
            quota_service_pb2.DeleteUsageAlertRequest(alert_id=alert_id),
            metadata=metadata or self.q.admin,
        )

    def events(self, after: int = 0, types: Sequence[str] = (), **kwargs):
        return events(self.stub, self.q.admin, after, types, **kwargs)
