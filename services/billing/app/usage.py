"""Pay-per-use: quota's ``pay_per_use_recorded`` events into hourly cycles, and the settlement
of each cycle once it has ended (docs/design/billing.md).

Intake
======

Billing consumes the ``WatchEvents`` stream of every quota deployment (one stream per distinct
endpoint of ``ALLOT_QUOTA_ENDPOINTS``) through the shared ``Subscriptions``, wired in
``services/billing/pay_per_use.py``. Each ``pay_per_use_recorded`` event adds its quantity to
the ``usage_cycles`` row of its account, region, API, enterprise project and hourly cycle (by
``occur_time``, in the billing time zone).
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

import logging
from datetime import datetime, timedelta

from services.billing.adapters import accounts_repository
from services.billing.adapters import usage_repository as repo
from services.billing.app.context import BillingContext
from services.billing.app.settlement import settle_due
from services.billing.domain.cycles import cycle_end, cycle_start
from services.billing.domain.usage import CycleKey, RecordedUsage
from shared.db import UnitOfWork
from shared.timeutil import to_epoch_us

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
    if usage.usage_event_id:
        # The line's events, for ExplainBillLine (docs/design/billing.md).
        await repo.record_event(uow, key, usage)
    return end


# --- settlement pacing ----------------------------------------------------------------------

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
