"""Pay-per-use as a billing process runs it: a consumer of each quota deployment's
`WatchEvents` (its `pay_per_use_recorded` events, read by `adapters/usage_events.py` and taken
by `app/usage.py`), the hourly settlement as due work, and a nudge that settles at once a cycle
whose usage arrives after it ended (services/billing/README.md; docs/faults.md, "Streams").

This is composition-root wiring beside `service.py`: the only part of pay-per-use that knows
gRPC, the stream and the process's tasks.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc

from services.billing.adapters import tables
from services.billing.adapters.usage_events import PAY_PER_USE_RECORDED, recorded_usage
from services.billing.app import usage
from services.billing.app.context import BillingContext
from services.billing.app.settlement import settle_due
from shared.clock import KickedWork, ManualClock
from shared.db import UnitOfWork
from shared.server import Runtime
from shared.streams.consumer import StreamConsumer
from shared.streams.subscriptions import Subscriptions
from shared.timeutil import from_timestamp


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
                [PAY_PER_USE_RECORDED],
                self._take,
            )
        self.subscriptions.start()
        self._tasks.append(asyncio.create_task(self._settlement.loop(), name="settle-late"))

    async def _take(self, uow: UnitOfWork, event: quota_pb2.QuotaEvent) -> None:
        self._last_intake = time.monotonic()
        if event.HasField("create_time"):
            self._intake_lag = self.ctx.now() - from_timestamp(event.create_time, "create_time")
        recorded = recorded_usage(event)
        if recorded is None:
            return
        end = await usage.take_pay_per_use(self.ctx, uow, recorded)
        if end is not None and end <= self.ctx.now():
            uow.after_commit(self.kick)  # its cycle is over already: settle it now

    def quiesce(self) -> None:
        self.subscriptions.quiesce()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.subscriptions.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
