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

Settlement
==========

Due work (``settle_due``) takes every unsettled cycle that has ended, oldest cycle first, one
small transaction per cycle, and for it:

1. prices the calls not billed yet with ``domain.pricing.price_usage``: the catalog's tiers of
   the region and the API's free monthly allowance, after ``used_before`` = the account's
   pay-per-use calls of that region and API already rated in the same calendar month of the
   billing time zone (free ones included, all enterprise projects). Calls are numbered in the
   order they are rated; since cycles are settled in cycle order that is the sum of the
   month's earlier cycles (and, for late usage, every call rated before it, so no tier number
   is ever given twice);
2. rounds the amount half up to the currency's minor unit, once per line
   (``domain.bills.pay_per_use_line``);
3. takes it from the paying account's balance (an enterprise member's master) and books a
   ledger line (``PAY_PER_USE``, on the member's/account's bill, paid by the payer, the cycle,
   the quantity, the tier breakdown as JSON, ``occur_time`` = the settlement instant);
4. marks the cycle settled (``entry_id`` = the line);
5. arrears: a charge that leaves the balance below zero starts ``GRACE`` now
   (``domain.arrears.after_charge``), announced for the payer and its members;
6. balance alert: when the charge takes the balance below the payer's threshold and the alert
   has not fired since the balance was last above it, ``balance_below_threshold`` is emitted.

A cycle of an API missing from billing's catalog cannot be priced: it is logged and left
unsettled (it is settled once the catalog has the API again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from allot.quota.v1 import quota_pb2, quota_service_pb2, quota_service_pb2_grpc
from sqlalchemy import false, func, insert, select, tuple_, update

from services.billing.adapters import tables as t
from services.billing.app import accounts
from services.billing.app.context import BillingContext
from services.billing.app.standing import arrears_state, change_standing, periods
from services.billing.domain.arrears import Standing, after_charge
from services.billing.domain.bills import BillLine, BillLineKind, pay_per_use_line
from services.billing.domain.cycles import cycle_end, cycle_start, month_bounds, month_key
from services.billing.domain.pricing import price_usage
from shared.auth import internal_metadata
from shared.clock import KickedWork, ManualClock
from shared.consumer import StreamConsumer, watching
from shared.db import UnitOfWork
from shared.ids import new_id
from shared.money import MoneyError
from shared.projects import DEFAULT_PROJECT
from shared.timeutil import from_epoch_us, from_timestamp, to_epoch_us

log = logging.getLogger("allot.billing.usage")

PAY_PER_USE_RECORDED = "pay_per_use_recorded"
# Cycles read per query, and the most cycles one run settles (the scheduler runs the work
# again while it reports progress, so a backlog is worked off in bounded steps).
PAGE = 200
MAX_PER_RUN = 2_000

_PPU = int(BillLineKind.PAY_PER_USE)


@dataclass(frozen=True)
class CycleKey:
    account_id: str
    region: str
    api: str
    enterprise_project_id: str
    cycle_start_us: int


class Unpriceable(Exception):
    """The catalog cannot price a cycle (its API is not in billing's catalog)."""


# --- intake ---------------------------------------------------------------------------------


async def take_pay_per_use(
    ctx: BillingContext, uow: UnitOfWork, event: quota_pb2.QuotaEvent
) -> datetime | None:
    """Add a ``pay_per_use_recorded`` event to its hourly cycle (in the consumer's transaction).

    Returns the end of the cycle it went into (None for an event that is not pay-per-use).
    """
    if event.WhichOneof("payload") != PAY_PER_USE_RECORDED:
        return None
    usage = event.pay_per_use_recorded
    if usage.quantity <= 0:
        log.warning("pay-per-use event %s has no calls; ignored", event.event_id)
        return None
    stamp = usage.occur_time if usage.HasField("occur_time") else event.create_time
    occurred = from_timestamp(stamp, "occur_time")
    start = cycle_start(occurred, ctx.tz)
    end = cycle_end(start, ctx.tz)
    key = CycleKey(
        usage.account_id,
        usage.region,
        usage.api,
        usage.enterprise_project_id,
        to_epoch_us(start),
    )
    c = t.usage_cycles.c
    row = (
        await uow.session.execute(select(c.quantity, c.settled).where(*_is(key)).with_for_update())
    ).first()
    if row is None:
        if not await _account_exists(uow, key.account_id):
            log.warning(
                "pay-per-use of unknown account %r (event %s): kept unsettled until it exists",
                key.account_id,
                event.event_id,
            )
        await uow.session.execute(
            insert(t.usage_cycles).values(
                account_id=key.account_id,
                region=key.region,
                api=key.api,
                enterprise_project_id=key.enterprise_project_id,
                cycle_start_us=key.cycle_start_us,
                cycle_end_us=to_epoch_us(end),
                quantity=usage.quantity,
                settled=False,
            )
        )
    else:
        if row.settled:
            log.debug(
                "late pay-per-use for %s %s/%s cycle %s: re-opened",
                key.account_id,
                key.region,
                key.api,
                start.isoformat(),
            )
        await uow.session.execute(
            update(t.usage_cycles)
            .where(*_is(key))
            .values(quantity=c.quantity + usage.quantity, settled=False)
        )
    return end


def _is(key: CycleKey) -> tuple:
    c = t.usage_cycles.c
    return (
        c.account_id == key.account_id,
        c.region == key.region,
        c.api == key.api,
        c.enterprise_project_id == key.enterprise_project_id,
        c.cycle_start_us == key.cycle_start_us,
    )


async def _account_exists(uow: UnitOfWork, account_id: str) -> bool:
    found = await uow.session.execute(
        select(t.accounts.c.account_id).where(t.accounts.c.account_id == account_id)
    )
    return found.first() is not None


# --- settlement -----------------------------------------------------------------------------


def _due_cycles(now_us: int, after: tuple | None):
    c = t.usage_cycles.c
    order = (c.cycle_start_us, c.account_id, c.region, c.api, c.enterprise_project_id)
    query = (
        select(*order)
        .where(
            c.settled == false(),
            c.cycle_end_us <= now_us,
            # Cycles of accounts billing does not know yet wait for them.
            c.account_id.in_(select(t.accounts.c.account_id)),
        )
        .order_by(*order)
        .limit(PAGE)
    )
    if after is not None:
        query = query.where(tuple_(*order) > tuple_(*after))
    return query


async def settle_due(ctx: BillingContext, now: datetime) -> int:
    """Settle every unsettled cycle that has ended by ``now``, in cycle order; returns how many
    lines were booked (at most MAX_PER_RUN per call)."""
    now_us = to_epoch_us(now)
    done = 0
    after: tuple | None = None
    while done < MAX_PER_RUN:
        due = await ctx.db.read(lambda uow, after=after: uow.rows(_due_cycles(now_us, after)))
        for row in due:
            key = CycleKey(
                row.account_id, row.region, row.api, row.enterprise_project_id, row.cycle_start_us
            )
            try:
                done += await ctx.db.transaction(
                    lambda uow, key=key: settle_cycle(ctx, uow, key, now)
                )
            except Unpriceable as exc:
                log.error("cannot settle %s: %s; left unsettled", key, exc)
        if len(due) < PAGE:
            break
        after = tuple(due[-1])
    return done


async def settle_cycle(ctx: BillingContext, uow: UnitOfWork, key: CycleKey, now: datetime) -> int:
    """Settle one cycle's calls not billed yet; 1 if a line was booked, else 0."""
    cycle = (
        await uow.session.execute(select(t.usage_cycles).where(*_is(key)).with_for_update())
    ).first()
    now_us = to_epoch_us(now)
    if cycle is None or cycle.settled or cycle.cycle_end_us > now_us:
        return 0
    billed = await _billed(uow, key) if cycle.entry_id else 0
    quantity = cycle.quantity - billed
    if quantity <= 0:  # nothing new (cannot happen while quantities only grow)
        await uow.session.execute(update(t.usage_cycles).where(*_is(key)).values(settled=True))
        return 0

    account = await accounts.load_account(uow, key.account_id)
    payer_id = account.master_account_id or account.account_id
    payer = (
        await uow.session.execute(
            select(t.accounts).where(t.accounts.c.account_id == payer_id).with_for_update()
        )
    ).first()
    if payer is None:  # a member whose master vanished: accounts are never deleted
        raise Unpriceable(f"the paying account {payer_id!r} does not exist")

    api = ctx.catalog.apis.get(key.api)
    if api is None:
        raise Unpriceable(f"API {key.api!r} is not in the catalog")
    start = from_epoch_us(key.cycle_start_us)
    used_before = await _rated_in_month(ctx, uow, key, start)
    try:
        priced = price_usage(
            api.tiers_for(key.region), api.free_monthly_quantity, used_before, quantity
        )
    except (MoneyError, ValueError) as exc:
        raise Unpriceable(f"the catalog's prices of {key.api!r}: {exc}") from exc
    try:
        line = pay_per_use_line(
            account_id=key.account_id,
            region=key.region,
            api=key.api,
            enterprise_project_id=key.enterprise_project_id,
            cycle=start,
            priced=priced,
            currency=payer.currency_code,
            settle_time=now,
            tz=ctx.tz,
            payer_account_id="" if payer_id == key.account_id else payer_id,
            description=_description(key, quantity, late=billed > 0),
        )
    except ValueError as exc:  # the stored cycle is not a cycle of the billing time zone
        raise Unpriceable(f"cycle {start.isoformat()}: {exc}") from exc
    entry_id = await book(ctx, uow, line, payer_id)
    await uow.session.execute(
        update(t.usage_cycles).where(*_is(key)).values(settled=True, entry_id=entry_id)
    )
    await _after_charge(ctx, uow, payer, line.amount_micros, now)
    return 1


def _description(key: CycleKey, quantity: int, late: bool) -> str:
    calls = "call" if quantity == 1 else "calls"
    text = f"{quantity} pay-per-use {calls} of {key.api} in {key.region}"
    if key.enterprise_project_id not in ("", DEFAULT_PROJECT):
        text += f", project {key.enterprise_project_id}"
    return text + (" (reported late)" if late else "")


async def _billed(uow: UnitOfWork, key: CycleKey) -> int:
    """Calls of the cycle already on ledger lines (a re-opened cycle)."""
    lg = t.ledger.c
    total = await uow.session.execute(
        select(func.coalesce(func.sum(lg.quantity), 0)).where(
            lg.account_id == key.account_id,
            lg.kind == _PPU,
            lg.region == key.region,
            lg.api == key.api,
            lg.enterprise_project_id == key.enterprise_project_id,
            lg.cycle_start_us == key.cycle_start_us,
        )
    )
    return int(total.scalar_one())


async def _rated_in_month(
    ctx: BillingContext, uow: UnitOfWork, key: CycleKey, start: datetime
) -> int:
    """The account's pay-per-use calls of the region and API already rated in the month of
    the cycle (billing time zone), every enterprise project, free calls included."""
    month_start, month_end = month_bounds(month_key(start, ctx.tz), ctx.tz)
    low, high = to_epoch_us(month_start), to_epoch_us(month_end)
    lg = t.ledger.c
    total = await uow.session.execute(
        select(func.coalesce(func.sum(lg.quantity), 0)).where(
            lg.account_id == key.account_id,
            # Settled after the cycle ended, so after the month began: keeps the index range.
            lg.occur_time_us >= low,
            lg.kind == _PPU,
            lg.region == key.region,
            lg.api == key.api,
            lg.cycle_start_us >= low,
            lg.cycle_start_us < high,
        )
    )
    return int(total.scalar_one())


def tiers_json(line: BillLine) -> str:
    return json.dumps(
        [
            {
                "tier": charge.tier,
                "quantity": charge.quantity,
                "unit_price": str(charge.unit_price),
                "amount_micros": charge.amount_micros,
            }
            for charge in line.tiers
        ]
    )


async def book(ctx: BillingContext, uow: UnitOfWork, line: BillLine, payer_id: str) -> str:
    """Take a pay-per-use line from the payer's balance and write its ledger line (signed by
    its effect, like every ledger line)."""
    a = t.accounts.c
    await uow.session.execute(
        update(t.accounts)
        .where(a.account_id == payer_id)
        .values(
            balance_micros=a.balance_micros + line.balance_effect,
            update_time_us=to_epoch_us(ctx.now()),
        )
    )
    entry_id = new_id("led")
    assert line.cycle_start is not None and line.cycle_end is not None
    await uow.session.execute(
        insert(t.ledger).values(
            entry_id=entry_id,
            account_id=line.account_id,
            paying_account_id=payer_id,
            kind=_PPU,
            amount_micros=line.balance_effect,
            region=line.region,
            api=line.api,
            enterprise_project_id=line.enterprise_project_id,
            cycle_start_us=to_epoch_us(line.cycle_start),
            cycle_end_us=to_epoch_us(line.cycle_end),
            quantity=line.quantity,
            tiers=tiers_json(line),
            description=line.description,
            occur_time_us=to_epoch_us(line.occur_time),
        )
    )
    return entry_id


async def _after_charge(ctx: BillingContext, uow: UnitOfWork, payer, amount: int, now: datetime):
    """Arrears and the balance alert after ``amount`` left the payer's balance."""
    balance = payer.balance_micros - amount
    before = arrears_state(payer)
    grace, retention = periods(payer)
    state = after_charge(before, balance, now, grace, retention)
    if state != before:
        await change_standing(ctx, uow, payer.account_id, Standing(before.standing), state)
    await accounts.balance_moved(ctx, uow, payer.account_id, payer.balance_micros, balance, now)


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
            end = await take_pay_per_use(self.ctx, uow, event)
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
