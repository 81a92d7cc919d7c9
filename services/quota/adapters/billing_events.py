"""Billing's events as quota reads them: `BillingEvent` protobuf -> domain `StandingChange`.

Quota follows billing's `WatchEvents` stream for one payload, `account_standing_changed`
(`app/standings.py` keeps the projection: standing, pay-per-use block in grace, master). An
event quota cannot use (another payload, no account, an unknown standing) reads as None, logged
when it was meant as a standing change: raising would hold the stream at that event forever.
"""

from __future__ import annotations

import logging
from datetime import datetime

from allot.billing.v1 import billing_pb2

from services.quota.domain.admission import Standing, StandingChange
from shared.errors import InvalidArgument
from shared.timeutil import from_timestamp
from shared.validation import check_account_id

log = logging.getLogger("allot.quota.standings")


def _change_time(event: billing_pb2.BillingEvent) -> datetime | None:
    """When the standing changed: the payload's change_time, else the event's create_time."""
    payload = event.account_standing_changed
    for owner, field in ((payload, "change_time"), (event, "create_time")):
        if owner.HasField(field):
            try:
                return from_timestamp(getattr(owner, field), field)
            except InvalidArgument:
                continue
    return None


def standing_change(event: billing_pb2.BillingEvent) -> StandingChange | None:
    """The standing change `event` announces, or None if it announces none quota can use."""
    if event.WhichOneof("payload") != "account_standing_changed":
        return None
    payload = event.account_standing_changed
    try:
        account_id = check_account_id(payload.account_id)
        standing = Standing(payload.standing)
        master = payload.master_account_id
        if master:
            check_account_id(master, "master_account_id")
    except (InvalidArgument, ValueError):
        log.warning(
            "billing event %s (sequence %d): unusable standing change %r of account %r; skipped",
            event.event_id,
            event.sequence,
            payload.standing,
            payload.account_id,
        )
        return None
    return StandingChange(
        account_id=account_id,
        standing=standing,
        change_time=_change_time(event),
        sequence=event.sequence,
        event_id=event.event_id,
        block_pay_per_use_in_grace=payload.block_pay_per_use_in_grace,
        master_account_id=master,
        # A negative cap cannot come from billing; read it as none rather than hold the stream.
        monthly_spending_cap_micros=max(0, payload.monthly_spending_cap_micros),
        spending_month=payload.spending_month,
        settled_by_region=tuple(
            sorted((r, max(0, a)) for r, a in payload.settled_pay_per_use_micros.items())
        ),
    )
