"""Reading quota's event stream (`WatchEvents`) in tests, up to a known position, bounded.

`WatchEvents` streams history and then stays open for live events, so "no more events" can
never be learned from silence. Every read here goes up to a known position instead: the
outbox's last sequence, which a stream opened past it reports (the refusal
`CURSOR_AHEAD_OF_STREAM` carries `last_sequence`; `head()`), or a sequence the test names
(`through=`). Events are committed in the transaction of the call that writes them, so once a
call has returned, reading to the head read after it sees everything that call wrote: "nothing
more" is checked by reading to that position, never by waiting for quiet. Sequences are
gap-free, so a read stops as soon as the event at its position arrives.

A read that does not reach its position within `within` seconds fails (AssertionError naming
the last sequence seen): a stream that stops short is a failure, not an empty answer. With
`types` (a server-side filter) the position is the last event of those types up to the head,
found by reading the unfiltered stream first, and the filtered stream must give exactly those.
A stream whose events the caller cannot all see (a region-limited token) is read to an explicit
`through` that it can see.

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

from shared.status import error_info
from tests.support.calls import Metadata
from tests.support.quota import ACCOUNT, REGION, QuotaCalls

# The longest one read may take, whatever comes: generous for a loaded 2-core machine.
TIMEOUT = 30.0
# A read never collects more than this many events.
MAX_EVENTS = 20_000
# A cursor past any real stream: opening a stream there makes the outbox tell its last sequence.
BEYOND = 2**62

ARMED = quota_pb2.USAGE_ALERT_STATE_ARMED
FIRED = quota_pb2.USAGE_ALERT_STATE_FIRED

THRESHOLD_CROSSED = "threshold_crossed"
PAY_PER_USE_RECORDED = "pay_per_use_recorded"
PACKAGE_STATE_CHANGED = "package_state_changed"
PACKAGE_EXPIRING = "package_expiring"


async def head(
    stub,
    metadata: Metadata,
    types: Sequence[str] = (),
    *,
    request_type=quota_service_pb2.WatchEventsRequest,
) -> int:
    """The outbox's last committed sequence now (quota's or billing's: `request_type`).

    Asks for a stream past the end: the outbox refuses it with CURSOR_AHEAD_OF_STREAM and
    its `last_sequence`. Any other answer (a refusal of the caller or of `types`) is raised."""
    call = stub.WatchEvents(
        request_type(after_sequence=BEYOND, event_types=list(types)),
        metadata=metadata,
        timeout=TIMEOUT,
    )
    try:
        got = await call.read()
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        if (
            error.code() == grpc.StatusCode.FAILED_PRECONDITION
            and info is not None
            and info.reason == "CURSOR_AHEAD_OF_STREAM"
        ):
            return int(info.metadata["last_sequence"])
        raise
    finally:
        call.cancel()
    raise AssertionError(f"WatchEvents after {BEYOND} answered {got!r} instead of refusing")


async def read_through(
    stub,
    metadata: Metadata,
    after: int,
    through: int,
    types: Sequence[str] = (),
    *,
    request_type=quota_service_pb2.WatchEventsRequest,
    within: float = TIMEOUT,
    limit: int = MAX_EVENTS,
) -> list:
    """The events after `after` up to and including sequence `through`, as the stream gives
    them (with its `types` filter). Fails unless the stream reaches `through` within
    `within` seconds; an event at `through` must be visible to this read."""
    if through <= after:
        return []
    call = stub.WatchEvents(
        request_type(after_sequence=after, event_types=list(types)),
        metadata=metadata,
        timeout=within + 5,
    )
    received: list = []
    deadline = time.monotonic() + within
    try:
        while len(received) < limit:
            left = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(call.read(), max(left, 0.001))
            except TimeoutError:
                event = None
            if event is None or event is grpc.aio.EOF:
                last = received[-1].sequence if received else after
                raise AssertionError(
                    f"WatchEvents after {after} stopped at sequence {last} "
                    f"({'ended' if event is not None else f'{within:.0f} s'}), "
                    f"short of {through}"
                )
            if event.sequence > through:
                break
            received.append(event)
            if event.sequence == through:
                break
    finally:
        call.cancel()
    return received


async def read_to_head(
    stub,
    metadata: Metadata,
    after: int = 0,
    types: Sequence[str] = (),
    *,
    request_type=quota_service_pb2.WatchEventsRequest,
    within: float = TIMEOUT,
    limit: int = MAX_EVENTS,
) -> tuple[list, int]:
    """(the events after `after` of `types` (empty = all) up to the head, the head): the
    head is read first, so everything committed before this call is in the answer."""
    position = await head(stub, metadata, types, request_type=request_type)
    if not types:
        found = await read_through(
            stub, metadata, after, position, request_type=request_type, within=within, limit=limit
        )
        return found, position
    # The filtered stream ends at the last event of these types up to the head: found in the
    # unfiltered stream, which the filtered one must then match exactly.
    everything = await read_through(
        stub, metadata, after, position, request_type=request_type, within=within
    )
    wanted = [e for e in everything if e.WhichOneof("payload") in types]
    if not wanted:
        return [], position
    found = await read_through(
        stub,
        metadata,
        after,
        wanted[-1].sequence,
        types,
        request_type=request_type,
        within=within,
        limit=limit,
    )
    assert found == wanted[:limit], f"filter {list(types)} gave {found}; the stream has {wanted}"
    return found, position


async def events(
    stub,
    metadata: Metadata,
    after: int = 0,
    types: Sequence[str] = (),
    *,
    at_least: int = 0,
    through: int | None = None,
    request_type=quota_service_pb2.WatchEventsRequest,
    within: float = TIMEOUT,
    limit: int = MAX_EVENTS,
) -> list:
    """The events after sequence `after` (of `types`; empty = all): up to `through` when
    given, else up to the head, read again as the head moves until `at_least` of them are
    there (up to `within` seconds; fewer are returned as they are: the caller's assertion says
    more than a timeout error would). Quota's stream, or billing's with its `request_type`."""
    if through is not None:
        return await read_through(
            stub,
            metadata,
            after,
            through,
            types,
            request_type=request_type,
            within=within,
            limit=limit,
        )
    deadline = time.monotonic() + within
    found, position = await read_to_head(
        stub, metadata, after, types, request_type=request_type, within=within, limit=limit
    )
    # Events another process writes (a consumer, a scheduler) may still be on their way.
    while len(found) < min(at_least, limit) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        more, position = await read_to_head(
            stub,
            metadata,
            position,
            types,
            request_type=request_type,
            within=max(deadline - time.monotonic(), 1.0),
            limit=limit - len(found),
        )
        found.extend(more)
    return found


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
        """Events written since the last call (every type; the cursor moves past them all),
        read up to the head: everything the calls before this one wrote, and nothing else.

        `at_least` counts events of `of_type` (any type when None) to wait for, for events
        written by work that goes on after a call returns; bounded by TIMEOUT."""
        fresh: list[quota_pb2.QuotaEvent] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            got, self.cursor = await read_to_head(self.stub, self.metadata, self.cursor)
            fresh.extend(got)
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
    depletion_days: int | None = None,
    forfeiture: int | None = None,
) -> quota_pb2.UsageAlert:
    """A UsageAlert with the threshold given (none: no threshold at all)."""
    message = quota_pb2.UsageAlert(account_id=account_id, region=region, api=api, enabled=enabled)
    if quantity is not None:
        message.remaining_quantity = quantity
    if percent is not None:
        message.remaining_percent = percent
    if depletion_days is not None:
        message.depletion_within_days = depletion_days
    if forfeiture is not None:
        message.forfeiture_above_quantity = forfeiture
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
