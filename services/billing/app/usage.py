"""Pay-per-use: quota's ``pay_per_use_recorded`` events into hourly cycles, and the settlement
of each cycle once it has ended (docs/design.md).

Intake
======

Billing consumes the ``WatchEvents`` stream of every quota deployment (one stream per distinct
endpoint of ``ALLOT_QUOTA_ENDPOINTS``) with the shared ``StreamConsumer``. Each
``pay_per_use_recorded`` event adds its quantity to the ``usage_cycles`` row of its account,
region, API, enterprise project and hourly cycle (by ``occur_time``, in the billing time zone).
The consumer stores its cursor in the same transaction, so every event is counted exactly once
whatever crashes.

- **Unknown accounts.** Quota does not know billing's accounts, and billing must not lose
  usage: the cycle is recorded anyway (with a warning) and waits, unsettled, until an account
  of that id exists; then it is settled like any other due cycle.
- **Late usage.** An event may arrive after its cycle was settled (a gateway reporting late,
  billing catching up after downtime). The cycle is re-opened with the added calls, and the
  next settlement charges only the calls not billed yet, as a further line of the same cycle.
  A cycle whose usage arrives after it ended is settled at once (the consumer nudges the
  settlement). So that a backlog read after an outage of billing does not make such lines by
  the hundred, settlement on the system clock waits while the intake is reading events
  recorded well before now (``settlement_waits``); the manual clock settles exactly when it
  is moved.

Settlement of the cycles is ``app/settlement.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from services.billing.adapters import accounts_repository
from services.billing.adapters import tables as t
from services.billing.adapters import usage_repository as repo
from services.billing.adapters.usage_events import PAY_PER_USE_RECORDED, recorded_usage
from services.billing.app.context import BillingContext
from services.billing.app.settlement import settle_due
from services.billing.domain.cycles import cycle_end, cycle_start
from services.billing.domain.usage import CycleKey, RecordedUsage
from shared.auth import internal_metadata
from shared.clock import KickedWork, ManualClock
from shared.consumer import StreamConsumer, watching
from shared.db import UnitOfWork
from shared.timeutil import from_timestamp, to_epoch_us

__all__ = ["settle_due", "settlement_waits", "take_pay_per_use"]

log = logging.getLogger("allot.billing.usage")


async def take_pay_per_use(
    ctx: BillingContext, uow: UnitOfWork, usage: RecordedUsage
) -> datetime | None:
    """Add recorded pay-per-use to its hourly cycle (in the consumer's transaction).

    Returns the end of the cycle it went into (None for usage without calls, ignored).
    """
    if usage.quantity <= 0:
        log.warning("pay-per-use event %s has no calls; ignored", usage.event_id)
        return None
    start = cycle_start(usage.occur_time, ctx.tz)
    end = cycle_end(start, ctx.tz)
    key = CycleKey(
        usage.account_id,
        usage.region,
        usage.api,
        usage.enterprise_project_id,
        to_epoch_us(start),
    )
    cycle = await repo.locked_cycle(uow, key)
    if cycle is None:
        if not await accounts_repository.exists(uow, key.account_id):
            log.warning(
                "pay-per-use of unknown account %r (event %s): kept unsettled until it exists",
                key.account_id,
                usage.event_id,
            )
        await repo.insert_cycle(uow, key, to_epoch_us(end), usage.quantity)
    else:
        if cycle.settled:
            log.debug(
                "late pay-per-use for %s %s/%s cycle %s: re-opened",
                key.account_id,
                key.region,
                key.api,
                start.isoformat(),
            )
        await repo.add_calls(uow, key, usage.quantity)
    return end


# --- wiring ---------------------------------------------------------------------------------

# Settlement on the system clock waits while the intake reads events this far behind the
# clock (a backlog after an outage of billing), so they land in their cycles before those are
# settled, instead of each becoming a "reported late" line. It waits at most MAX_WAIT.
BACKLOG_LAG = timedelta(seconds=30)
BUSY_WITHIN = 2.0  # seconds since the last event applied: the intake is still reading
MAX_WAIT = 600.0


def settlement_waits(since_intake: float, intake_lag: timedelta, waited: float) -> bool:
    """Whether settlement should wait for the intake: it applied an event in the last
    BUSY_WITHIN seconds, that event was recorded more than BACKLOG_LAG before now (so older
    ones may still come), and settlement has not waited MAX_WAIT already. Live traffic is
    fresh and never holds settlement up."""
    return since_intake < BUSY_WITHIN and intake_lag > BACKLOG_LAG and waited < MAX_WAIT


_WIRED = "_allot_pay_per_use_wiring"


class PayPerUse:
    """What runs pay-per-use in a billing process: a consumer of each quota deployment's
    stream, the hourly settlement as due work, and a nudge that settles at once a cycle whose
    usage arrives after it ended. ``start`` / ``quiesce`` / ``stop`` follow the service's."""

    def __init__(self, service) -> None:
        self.runtime = service.runtime
        self.ctx: BillingContext = service.context
        self.consumers: list[StreamConsumer] = []
        self._tasks: list[asyncio.Task] = []
        self._settlement = KickedWork(self.runtime.clock, self._settle_round, "settling usage")
        self._stopped = False
        # The intake as the settlement sees it: when an event was last applied (monotonic
        # seconds), how far behind the clock that event was, and since when settlement waits.
        self._last_intake = float("-inf")
        self._intake_lag = timedelta(0)
        self._waiting_since: float | None = None

    async def _settle_round(self, now: datetime) -> int:
        if self._catching_up(now):
            return 0
        return await settle_due(self.ctx, now)

    def _catching_up(self, now: datetime) -> bool:
        """On the system clock, settlement waits while the intake reads a backlog (see
        ``settlement_waits``); the manual clock settles exactly when it is moved."""
        if isinstance(self.runtime.clock, ManualClock):
            return False
        mono = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = mono
        waits = settlement_waits(
            mono - self._last_intake, self._intake_lag, mono - self._waiting_since
        )
        if not waits:
            self._waiting_since = None
        return waits

    def kick(self) -> None:
        self._settlement.kick()

    def start(self) -> None:
        self.runtime.scheduler.register("billing.pay_per_use", self._settlement.run)
        for addr in self.runtime.settings.quota_addresses(list(self.runtime.catalog.regions)):
            self.consumers.append(self._consumer(addr))
        for consumer in self.consumers:
            self._tasks.append(asyncio.create_task(consumer.run(), name=consumer.stream))
        self._tasks.append(asyncio.create_task(self._settlement.loop(), name="settle-late"))

    def _consumer(self, addr: str) -> StreamConsumer:
        channels = self.runtime.channels

        def watch(request, metadata):  # a fresh stub per connection: channels follow rotation
            stub = quota_service_pb2_grpc.QuotaServiceStub(channels.get(addr))
            return stub.WatchEvents(request, metadata=metadata)

        async def apply(uow: UnitOfWork, event: quota_pb2.QuotaEvent) -> None:
            self._last_intake = time.monotonic()
            if event.HasField("create_time"):
                self._intake_lag = self.ctx.now() - from_timestamp(event.create_time, "create_time")
            usage = recorded_usage(event)
            end = await take_pay_per_use(self.ctx, uow, usage) if usage is not None else None
            if end is not None and end <= self.ctx.now():
                uow.after_commit(self.kick)  # its cycle is over already: settle it now

        return watching(
            f"quota@{addr}",
            self.runtime.db,
            (t.consumer_cursors, t.consumer_leases),
            watch,
            quota_service_pb2.WatchEventsRequest,
            [PAY_PER_USE_RECORDED],
            internal_metadata(self.runtime.signer, "billing"),
            apply,
            lease_ttl=float(self.runtime.settings.consumer_lease_seconds),
        )

    def quiesce(self) -> None:
        for consumer in self.consumers:
            consumer.stop()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.quiesce()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def wire_usage(service) -> PayPerUse:
    """Start pay-per-use in a ``BillingService`` (once per service; call from its ``start``,
    before ``standing.wire_standing``). Call ``quiesce()`` / ``await stop()`` on the result
    from the service's own."""
    existing = getattr(service, _WIRED, None)
    if existing is not None:
        return existing
    wiring = PayPerUse(service)
    wiring.start()
    setattr(service, _WIRED, wiring)
    return wiring
