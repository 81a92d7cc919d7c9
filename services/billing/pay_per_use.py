"""Pay-per-use as a billing process runs it: a consumer of each quota deployment's
`WatchEvents` (its `pay_per_use_recorded` events, read by `adapters/usage_events.py` and taken
by `app/usage.py`), the hourly settlement as due work, and a nudge that settles at once a cycle
whose usage arrives after it ended (services/billing/README.md; docs/faults.md, "Streams").
The same consumer takes quota's `threshold_crossed` events for auto-replenish
(`app/replenish.py`, docs/design/auto-replenish.md): one subscription per quota deployment.

This is composition-root wiring beside `service.py`: the only part of pay-per-use that knows
gRPC, the stream and the process's tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from services.billing.adapters import tables
from services.billing.adapters.usage_events import (
    PAY_PER_USE_RECORDED,
    THRESHOLD_CROSSED,
    crossing,
    recorded_usage,
)
from services.billing.app import fulfilment, replenish, usage
from services.billing.app.context import BillingContext
from services.billing.app.settlement import settle_due
from shared.clock import KickedWork, ManualClock
from shared.db import UnitOfWork
from shared.server import Runtime
from shared.streams.consumer import StreamConsumer
from shared.streams.subscriptions import Subscriptions
from shared.timeutil import from_timestamp

log = logging.getLogger("allot.billing.pay_per_use")


class PayPerUse:
    """What runs pay-per-use in a billing process. ``start`` / ``quiesce`` / ``stop`` follow
    the service's; start it before the arrears clock (``standing.wire_standing``), so one
    pass of due work sees a grace that a settlement started."""

    def __init__(self, runtime: Runtime, ctx: BillingContext) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.subscriptions = Subscriptions.of(
            runtime, "billing", (tables.consumer_cursors, tables.consumer_leases)
        )
        self._tasks: list[asyncio.Task] = []
        self._fulfilling: set[asyncio.Task] = set()
        self._settlement = KickedWork(runtime.clock, self._settle_round, "settling usage")
        self._stopped = False
        # The intake as the settlement sees it: when an event was last applied (monotonic
        # seconds), how far behind the clock that event was, and since when settlement waits.
        self._last_intake = float("-inf")
        self._intake_lag = timedelta(0)
        self._waiting_since: float | None = None

    @property
    def consumers(self) -> list[StreamConsumer]:
        """One consumer per quota deployment (stream ``quota@<addr>``)."""
        return self.subscriptions.consumers

    async def _settle_round(self, now: datetime) -> int:
        if self._catching_up(now):
            return 0
        return await settle_due(self.ctx, now)

    def _catching_up(self, now: datetime) -> bool:
        """On the system clock, settlement waits while the intake reads a backlog (see
        ``usage.settlement_waits``); the manual clock settles exactly when it is moved."""
        if isinstance(self.runtime.clock, ManualClock):
            return False
        mono = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = mono
        waits = usage.settlement_waits(
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
            self.subscriptions.subscribe(
                f"quota@{addr}",
                addr,
                quota_service_pb2_grpc.QuotaServiceStub,
                quota_service_pb2.WatchEventsRequest,
                [PAY_PER_USE_RECORDED, THRESHOLD_CROSSED],
                self._take,
            )
        self.subscriptions.start()
        self._tasks.append(asyncio.create_task(self._settlement.loop(), name="settle-late"))

    async def _take(self, uow: UnitOfWork, event: quota_pb2.QuotaEvent) -> None:
        crossed = crossing(event)
        if crossed is not None:
            order_id = await replenish.take_crossing(self.ctx, uow, crossed)
            if order_id is not None:
                uow.after_commit(lambda: self._fulfil_soon(order_id))
            return
        self._last_intake = time.monotonic()
        if event.HasField("create_time"):
            self._intake_lag = self.ctx.now() - from_timestamp(event.create_time, "create_time")
        recorded = recorded_usage(event)
        if recorded is None:
            return
        end = await usage.take_pay_per_use(self.ctx, uow, recorded)
        if end is not None and end <= self.ctx.now():
            uow.after_commit(self.kick)  # its cycle is over already: settle it now

    def _fulfil_soon(self, order_id: str) -> None:
        """Ask quota for an auto-replenish order's package now, not at the next round of
        pending orders (which still takes it should this fail)."""
        task = asyncio.create_task(self._fulfil(order_id), name=f"fulfil {order_id}")
        self._fulfilling.add(task)
        task.add_done_callback(self._fulfilling.discard)

    async def _fulfil(self, order_id: str) -> None:
        try:
            await fulfilment.fulfil(self.ctx, order_id)
        except Exception:  # the pending-orders round offers it again
            log.exception("fulfilling auto-replenish order %s failed", order_id)

    def quiesce(self) -> None:
        self.subscriptions.quiesce()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.subscriptions.stop()
        tasks = [*self._tasks, *self._fulfilling]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
